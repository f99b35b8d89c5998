//! Reading weights out of memory-mapped safetensors files without holding them twice.
//!
//! candle's CPU tensors own their storage, so every weight is copied out of the mapping (or, on
//! a GPU, uploaded from it). A mapped page that was read stays in the process's resident set
//! until the mapping goes away, so loading a component used to hold its whole file twice: the
//! mapped pages and the copies (the UNet: 3.4 GB + 3.4 GB). Here each tensor's pages are given
//! back (`MADV_DONTNEED`) as soon as the tensor is copied; they stay in the OS page cache, so the
//! next start still reads them from memory. A load then peaks at the weights plus about one
//! tensor. The copy itself runs in parallel chunks, each first backing its fresh pages in one
//! call (`MADV_POPULATE_WRITE`) instead of one page fault per 4 KiB page, and linear weights the
//! model keeps transposed are written transposed straight from the file (one pass, no second
//! copy). Transparent huge pages (`MADV_HUGEPAGE`) were measured too and left out: on a machine
//! whose memory is full of page cache they made the kernel compact memory during the load and
//! cost more system time than the 4 KiB faults they saved.
//!
//! When the binary installs [`mapped::MappedAlloc`] as its global allocator, f32 weights kept
//! as stored on an f32 CPU are not copied at all: their tensors' storage is the private mapping
//! of the file ([`SafetensorsFile::load`]). Only what the CPU path keeps in another layout
//! (transposed linear weights) or another dtype is copied, as above.
//!
//! Files: `copy` (the parallel f32 copies and the transposed copy), `mapped` (the mapping and
//! its allocator), `tests`; this one reads tensors out of a file and gives pages back.

mod copy;
pub mod mapped;

pub(crate) use copy::read_f32_at;
pub use copy::transpose_f32;
use copy::{bytemuck_f32, copy_f32, copy_f32_sampled};

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Metadata, TensorView};

/// Appended to a weight's name, asks a loader for its transpose (see [`load_view_transposed`]).
/// Only the safetensors loader knows such names; model code asks for one only after
/// `contains_tensor` said yes, and otherwise loads the weight and transposes it itself.
pub const TRANSPOSED: &str = "^T";

/// A safetensors file mapped whole ([`mapped::MappedFile`], private and writable: writes stay
/// in this process), its header parsed.
pub struct SafetensorsFile {
    map: mapped::MappedFile,
    /// Byte offset of the data section (after the 8-byte length and the header).
    data_start: usize,
    meta: Metadata,
    /// Tensors whose storage was handed out as the mapping: each at most once, so no two
    /// tensors share (alias) the same bytes; a second request for one copies.
    handed_out: Mutex<HashSet<String>>,
}

impl SafetensorsFile {
    /// Maps `path` and reads its header. The file must not be truncated while mapped
    /// ([`mapped`]'s documentation).
    pub fn open(path: &Path) -> Result<Self, String> {
        let map = mapped::MappedFile::open(path).map_err(|e| e.to_string())?;
        let (n, meta) =
            safetensors::SafeTensors::read_metadata(map.bytes()).map_err(|e| e.to_string())?;
        Ok(Self {
            map,
            data_start: 8 + n,
            meta,
            handed_out: Mutex::new(HashSet::new()),
        })
    }

    /// The names of the tensors in the file.
    pub fn names(&self) -> Vec<String> {
        self.meta.offset_keys()
    }

    /// The view of tensor `name`, and its data's byte offset in the file.
    pub fn view(&self, name: &str) -> Option<(TensorView<'_>, usize)> {
        let info = self.meta.info(name)?;
        let (a, b) = info.data_offsets;
        let data = &self.map.bytes()[self.data_start + a..self.data_start + b];
        let view = TensorView::new(info.dtype, info.shape.clone(), data).ok()?;
        Some((view, self.data_start + a))
    }

    /// Tensor `name` as `dtype` on `device`, and the index of the first NaN or Inf among the
    /// sampled elements (see [`load_view_sampled`]); `true` when its storage is the mapping
    /// itself (f32 kept as f32 on the CPU, with [`mapped::MappedAlloc`] installed), `false`
    /// when it was copied (or uploaded), after which its pages may be released.
    pub fn load(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<(Tensor, Option<usize>, bool)> {
        let Some((view, offset)) = self.view(name) else {
            candle_core::bail!("no tensor `{name}`");
        };
        if device.is_cpu()
            && view.dtype() == safetensors::Dtype::F32
            && dtype == DType::F32
            && cfg!(target_endian = "little")
            && self.map.is_registered()
        {
            let mut handed_out = self.handed_out.lock().unwrap_or_else(|e| e.into_inner());
            if !handed_out.contains(name) {
                let n = view.data().len() / 4;
                // SAFETY: `handed_out` makes each tensor's range (disjoint from every other
                // tensor's: safetensors validates the offsets) handed out at most once.
                if let Some(v) = unsafe { self.map.vec_f32(offset, n) } {
                    handed_out.insert(name.to_string());
                    let bad = crate::single_file::first_non_finite(view.dtype(), view.data());
                    return Ok((Tensor::from_vec(v, view.shape(), device)?, bad, true));
                }
            }
        }
        let (t, bad) = load_view_sampled(&view, dtype, device)?;
        Ok((t, bad, false))
    }

    /// Gives the pages of `data` (a view into this file) back to the OS once it was copied:
    /// the whole pages inside it when tensors may live in the mapping (a page it shares with a
    /// neighbour may hold that neighbour's storage), all of its pages otherwise.
    pub fn release(&self, data: &[u8]) {
        if self.map.is_registered() {
            #[cfg(target_os = "linux")]
            {
                let page = page_size();
                let start = (data.as_ptr() as usize).div_ceil(page) * page;
                let end = (data.as_ptr() as usize + data.len()) / page * page;
                if end > start {
                    // SAFETY: whole pages inside `data`, a copied tensor's bytes in this
                    // file's private mapping that no tensor uses as storage and nothing wrote:
                    // they are read back from the file if touched again.
                    unsafe {
                        libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED)
                    };
                }
            }
        } else {
            // SAFETY: `data` lies in this file's mapping, which nothing wrote (no tensor
            // lives in it when it is not registered).
            unsafe { release_mapped(data) };
        }
    }
}

/// The bytes of an f32 CPU tensor's storage, from its first element on; `None` for other tensors.
fn cpu_f32_bytes(t: &Tensor) -> Option<(usize, usize)> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(c) => {
            let s = c.as_slice::<f32>().ok()?.get(layout.start_offset()..)?;
            Some((s.as_ptr() as usize, std::mem::size_of_val(s)))
        }
        _ => None,
    }
}

/// Whether `t`'s storage is a mapped weight file ([`mapped`]) rather than its own memory.
pub fn in_mapping(t: &Tensor) -> bool {
    cpu_f32_bytes(t).is_some_and(|(p, _)| mapped::in_mapping(p as *const u8))
}

/// Drops `t` and, when its storage is a mapped weight file, takes the whole pages under it out
/// of the process: they are replaced by an inaccessible anonymous reservation (no memory, and
/// the range stays the mapping's, so the allocator's bookkeeping is unchanged and no other
/// allocation can land there before the file is unmapped). `MADV_DONTNEED` is not enough: with
/// the large page-cache folios of recent kernels, pages it released were measured to stay (or
/// come back) in the resident set, about 200 MB of the 1.3 GB of SD 1.5's linear weights.
///
/// # Safety
/// `t` must be the only handle on its storage (no clone, no view of it alive elsewhere): those
/// pages can never be read again.
pub(crate) unsafe fn discard_storage(t: Tensor) {
    let Some((p, len)) = cpu_f32_bytes(&t) else {
        return;
    };
    if !mapped::in_mapping(p as *const u8) {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        let page = page_size();
        let start = p.div_ceil(page) * page;
        let end = (p + len) / page * page;
        if end > start {
            // SAFETY: whole pages inside `t`'s storage, a range of a registered private file
            // mapping that no other tensor shares (each range is handed out once) and nobody
            // reads again (the caller's duty). A failure leaves the pages mapped.
            unsafe {
                libc::mmap(
                    start as *mut libc::c_void,
                    end - start,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
        }
    }
    drop(t);
}

/// The tensor of `view` as `dtype` on `device`. An f32 tensor kept in f32 on the CPU is copied
/// in parallel; anything else goes through candle's conversion.
pub fn load_view(
    view: &TensorView<'_>,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    if device.is_cpu()
        && view.dtype() == safetensors::Dtype::F32
        && dtype == DType::F32
        && cfg!(target_endian = "little")
    {
        return Tensor::from_vec(copy_f32(view.data()), view.shape(), device);
    }
    view.load(device)?.to_dtype(dtype)
}

/// As [`load_view`], and the index of the first NaN or Inf among the elements the load check
/// samples (`single_file::first_non_finite`'s samples, with the same answer). The f32 copy
/// looks at them in each chunk right after writing it, while it is in cache.
pub fn load_view_sampled(
    view: &TensorView<'_>,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<(Tensor, Option<usize>)> {
    if device.is_cpu()
        && view.dtype() == safetensors::Dtype::F32
        && dtype == DType::F32
        && cfg!(target_endian = "little")
    {
        let (v, bad) = copy_f32_sampled(view.data(), true);
        return Ok((Tensor::from_vec(v, view.shape(), device)?, bad));
    }
    let bad = crate::single_file::first_non_finite(view.dtype(), view.data());
    Ok((load_view(view, dtype, device)?, bad))
}

/// The transpose of the 2-D weight under `view` (`[rows, cols, 1, ..]` read as `[rows, cols]`)
/// as a contiguous `[cols, rows]` tensor of `dtype` on `device`. f32 kept in f32 on the CPU is
/// written transposed straight from the file's bytes: one pass and one allocation instead of a
/// copy and then a transposed copy of it.
pub fn load_view_transposed(
    view: &TensorView<'_>,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let Some((rows, cols)) = matrix_dims(view.shape()) else {
        candle_core::bail!(
            "a transposed load needs a matrix, not shape {:?}",
            view.shape()
        );
    };
    if device.is_cpu()
        && view.dtype() == safetensors::Dtype::F32
        && dtype == DType::F32
        && cfg!(target_endian = "little")
    {
        let bytes = view.data();
        let out = match bytemuck_f32(bytes) {
            Some(src) => transpose_f32(rows, cols, src),
            // Unaligned data (rare): an aligned copy first.
            None => transpose_f32(rows, cols, &copy_f32(bytes)),
        };
        return Tensor::from_vec(out, (cols, rows), device);
    }
    load_view(view, dtype, device)?
        .reshape((rows, cols))?
        .t()?
        .contiguous()
}

/// `[rows, cols]` of a shape that is a matrix followed only by ones (a linear weight, or a 1x1
/// convolution's `[out, in, 1, 1]`).
pub fn matrix_dims(shape: &[usize]) -> Option<(usize, usize)> {
    match shape {
        [rows, cols, rest @ ..] if rest.iter().all(|&d| d == 1) => Some((*rows, *cols)),
        _ => None,
    }
}

/// Gives the pages under `data` back to the OS: they leave this process's resident set and
/// stay in the page cache; reading `data` again faults them back in from there.
///
/// # Safety
/// `data` must lie inside a mapping of a file that nothing wrote (never anonymous or heap
/// memory, which `MADV_DONTNEED` would zero, nor a private mapping's written pages). Whole pages around it are released, which is harmless for the
/// neighbouring bytes of the same file mapping: they are read again from the file when touched.
pub unsafe fn release_mapped(data: &[u8]) {
    #[cfg(target_os = "linux")]
    {
        if data.is_empty() {
            return;
        }
        let page = page_size();
        let start = data.as_ptr() as usize;
        let begin = start / page * page;
        let end = (start + data.len()).div_ceil(page) * page;
        // A failure only means the pages stay resident until the mapping is dropped.
        libc::madvise(begin as *mut libc::c_void, end - begin, libc::MADV_DONTNEED);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = data;
}

#[cfg(target_os = "linux")]
fn page_size() -> usize {
    use std::sync::OnceLock;
    static PAGE: OnceLock<usize> = OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *PAGE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        p if p > 0 => p as usize,
        _ => 4096,
    })
}

/// The files in `dir` whose extension is one of `exts`, in directory order, as they are listed
/// (an adapter library's scan); an unreadable directory or entry is an I/O error naming `dir`.
pub(crate) fn files_with_extension<'a>(
    dir: &'a Path,
    exts: &'a [&'a str],
) -> crate::Result<impl Iterator<Item = crate::Result<std::path::PathBuf>> + 'a> {
    let list = std::fs::read_dir(dir).map_err(|e| crate::PipelineError::io(dir, e))?;
    Ok(list.filter_map(move |entry| match entry {
        Err(e) => Some(Err(crate::PipelineError::io(dir, e))),
        Ok(entry) => {
            let path = entry.path();
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            exts.contains(&ext).then_some(Ok(path))
        }
    }))
}

/// Has the OS read `path` into the page cache, from a background thread, so that a cold start
/// reads the file in large sequential requests instead of faulting it in a little at a time in
/// the order the model code asks for tensors (which is not the file's order). Nearly free when
/// the file is already cached.
pub fn prefetch(path: &Path) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let Ok(file) = std::fs::File::open(path) else {
            return;
        };
        // Submitting the reads can block while the device queue is full: not on the loader.
        let _ = std::thread::Builder::new()
            .name("sdserve-prefetch".into())
            .spawn(move || {
                // SAFETY: a valid descriptor, owned by this thread; WILLNEED only starts reads.
                unsafe {
                    libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED);
                }
            });
    }
    #[cfg(not(target_os = "linux"))]
    let _ = path;
}

#[cfg(test)]
mod tests;
