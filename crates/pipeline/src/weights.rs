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

pub mod mapped;

use std::collections::HashSet;
use std::mem::MaybeUninit;
use std::path::Path;
use std::sync::Mutex;

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use safetensors::tensor::{Metadata, TensorView};

/// Appended to a weight's name, asks a loader for its transpose (see [`load_view_transposed`]).
/// Only the safetensors loader knows such names; model code asks for one only after
/// `contains_tensor` said yes, and otherwise loads the weight and transposes it itself.
pub const TRANSPOSED: &str = "^T";

/// Bytes per parallel copy task.
const COPY_CHUNK: usize = 4 << 20;

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

/// `bytes` as f32s when they are 4-byte aligned (safetensors pads its header to 8, so the data
/// of a mapped file normally is); `None` otherwise.
fn bytemuck_f32(bytes: &[u8]) -> Option<&[f32]> {
    if !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<f32>()) {
        return None;
    }
    // SAFETY: aligned, in bounds, and any 4 bytes are a valid f32 (little-endian host).
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast(), bytes.len() / 4) })
}

/// Input columns (= output rows) per parallel task of the transposed copy: the output rows it
/// writes 8 values at a time stay in L1 (256 x 64 B), and each input row is read 1 KiB at a time.
const TRANSPOSE_COLS: usize = 256;

/// `src^T` of a row-major `[rows, cols]` matrix as a new row-major `[cols, rows]` vector, in
/// 8x8 blocks (whole cache lines written, input rows read sequentially), parallel over the
/// output's rows.
pub fn transpose_f32(rows: usize, cols: usize, src: &[f32]) -> Vec<f32> {
    let n = rows * cols;
    assert_eq!(
        src.len(),
        n,
        "transpose of {rows}x{cols} from {} values",
        src.len()
    );
    let mut out: Vec<f32> = Vec::with_capacity(n);
    if n > 0 {
        out.spare_capacity_mut()[..n]
            .par_chunks_mut(TRANSPOSE_COLS * rows)
            .enumerate()
            .for_each(|(bi, block)| {
                prefault(block);
                let c0 = bi * TRANSPOSE_COLS;
                let cs = block.len() / rows;
                for r0 in (0..rows).step_by(8) {
                    let rh = (rows - r0).min(8);
                    for c in (0..cs).step_by(8) {
                        let cw = (cs - c).min(8);
                        if rh == 8 && cw == 8 {
                            let mut t = [[0f32; 8]; 8];
                            for (i, t_row) in t.iter_mut().enumerate() {
                                let from = (r0 + i) * cols + c0 + c;
                                t_row.copy_from_slice(&src[from..from + 8]);
                            }
                            for j in 0..8 {
                                let to = (c + j) * rows + r0;
                                for (d, t_row) in block[to..to + 8].iter_mut().zip(&t) {
                                    d.write(t_row[j]);
                                }
                            }
                        } else {
                            for i in 0..rh {
                                for j in 0..cw {
                                    block[(c + j) * rows + r0 + i]
                                        .write(src[(r0 + i) * cols + c0 + c + j]);
                                }
                            }
                        }
                    }
                }
            });
    }
    // SAFETY: the blocks cover all n elements, each written once above.
    unsafe { out.set_len(n) };
    out
}

/// Little-endian f32 bytes (any alignment) into a new vector, in parallel chunks.
fn copy_f32(bytes: &[u8]) -> Vec<f32> {
    copy_f32_sampled(bytes, false).0
}

/// As [`copy_f32`]; with `sample`, also the index of the first NaN or Inf among the elements
/// `0, step, 2 * step, ..` and the last (`single_file::finite_sample_step`), looked at in each
/// chunk as soon as it is written.
fn copy_f32_sampled(bytes: &[u8], sample: bool) -> (Vec<f32>, Option<usize>) {
    let n = bytes.len() / 4;
    let step = crate::single_file::finite_sample_step(n);
    let mut v: Vec<f32> = Vec::with_capacity(n);
    let per_task = COPY_CHUNK / 4;
    let bad = v.spare_capacity_mut()[..n]
        .par_chunks_mut(per_task)
        .zip(bytes[..n * 4].par_chunks(COPY_CHUNK))
        .enumerate()
        .filter_map(
            |(ci, (dst, src)): (usize, (&mut [MaybeUninit<f32>], &[u8]))| {
                prefault(dst);
                // SAFETY: `dst` has room for `src.len() / 4` f32s, the two do not overlap, and any
                // 4 bytes are a valid f32 (little-endian, as safetensors stores them).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        src.as_ptr(),
                        dst.as_mut_ptr().cast::<u8>(),
                        src.len(),
                    )
                }
                if !sample {
                    return None;
                }
                // SAFETY: all of `dst` was written just above.
                let done: &[f32] =
                    unsafe { std::slice::from_raw_parts(dst.as_ptr().cast(), dst.len()) };
                let (from, to) = (ci * per_task, ci * per_task + done.len());
                // All exponent bits set: Inf or NaN.
                let bad = |i: &usize| done[i - from].to_bits() & 0x7F80_0000 == 0x7F80_0000;
                (from.div_ceil(step) * step..to)
                    .step_by(step)
                    .chain((to == n).then_some(n - 1))
                    .find(bad)
            },
        )
        .min();
    // SAFETY: all `n` elements were written above.
    unsafe { v.set_len(n) };
    (v, bad)
}

/// Has the kernel back the whole pages of `buf` (fresh memory about to be written in full)
/// in one call (`MADV_POPULATE_WRITE`, Linux 5.14+) instead of one page fault per page as the
/// copy reaches them: about a third less CPU for the same zeroed pages. Contents are not
/// changed; older kernels refuse and the copy faults them in as before.
fn prefault(buf: &mut [MaybeUninit<f32>]) {
    #[cfg(target_os = "linux")]
    {
        let page = page_size();
        let start = (buf.as_ptr() as usize).div_ceil(page) * page;
        let end = (buf.as_ptr() as usize + std::mem::size_of_val(buf)) / page * page;
        if end > start {
            // SAFETY: whole pages inside `buf`, which this thread may write; populating them
            // writes nothing.
            unsafe {
                libc::madvise(
                    start as *mut libc::c_void,
                    end - start,
                    libc::MADV_POPULATE_WRITE,
                );
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
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
mod tests {
    use super::*;

    /// File-backed resident memory (other tests' allocations do not move it).
    fn rss_kb() -> usize {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("RssFile:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    }

    #[test]
    fn f32_copy_matches_candle_at_any_alignment() -> candle_core::Result<()> {
        let vals: Vec<f32> = (0..(3 << 20) + 5).map(|i| i as f32 * 0.25 - 7.0).collect();
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        // Offset by one byte: the copy may not assume alignment.
        let mut shifted = vec![0u8; bytes.len() + 1];
        shifted[1..].copy_from_slice(&bytes);
        for data in [&bytes[..], &shifted[1..]] {
            let view =
                TensorView::new(safetensors::Dtype::F32, vec![vals.len()], data).expect("view");
            let t = load_view(&view, DType::F32, &Device::Cpu)?;
            assert_eq!(t.to_vec1::<f32>()?, vals);
            let h = load_view(&view, DType::F16, &Device::Cpu)?;
            assert_eq!(h.dtype(), DType::F16);
        }
        Ok(())
    }

    #[test]
    fn the_copy_finds_the_sampled_nan_the_mapping_check_finds() -> candle_core::Result<()> {
        // Several chunks; a NaN on a sample, one between samples (not looked at), Inf last.
        let n = (3 << 20) + 7;
        let step = crate::single_file::finite_sample_step(n);
        for (bad_at, value) in [
            (None, 0.0),
            (Some(5 * step), f32::NAN),
            (Some(2 * step + 1), f32::INFINITY),
            (Some(n - 1), f32::NEG_INFINITY),
            (Some(n - 1 - (n - 1) % step), f32::NAN),
        ] {
            let mut vals: Vec<f32> = (0..n).map(|i| (i % 1000) as f32).collect();
            if let Some(i) = bad_at {
                vals[i] = value;
            }
            let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
            let view = TensorView::new(safetensors::Dtype::F32, vec![n], &bytes).expect("view");
            let (t, found) = load_view_sampled(&view, DType::F32, &Device::Cpu)?;
            let want = crate::single_file::first_non_finite(safetensors::Dtype::F32, &bytes);
            assert_eq!(found, want, "{bad_at:?}");
            assert_eq!(
                found.is_some(),
                bad_at.is_some_and(|i| i % step == 0 || i == n - 1)
            );
            let got = t.to_vec1::<f32>()?;
            assert!(got
                .iter()
                .zip(&vals)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
        Ok(())
    }

    #[test]
    fn transposed_load_matches_candle_at_any_alignment_and_dtype() -> candle_core::Result<()> {
        // Off the tile size both ways; a 1x1 convolution's [out, in, 1, 1]; one row.
        for shape in [
            vec![130, 67],
            vec![40, 24, 1, 1],
            vec![1, 200],
            vec![200, 1],
        ] {
            let (rows, cols) = matrix_dims(&shape).expect("a matrix");
            // Exact in f16 too, and distinct enough along rows and columns to catch a swap.
            let vals: Vec<f32> = (0..rows * cols)
                .map(|i| (i % 251) as f32 * 0.5 - 3.0)
                .collect();
            let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
            let mut shifted = vec![0u8; bytes.len() + 1];
            shifted[1..].copy_from_slice(&bytes);
            let want = Tensor::from_vec(vals, (rows, cols), &Device::Cpu)?
                .t()?
                .contiguous()?;
            for data in [&bytes[..], &shifted[1..]] {
                let view =
                    TensorView::new(safetensors::Dtype::F32, shape.clone(), data).expect("view");
                let t = load_view_transposed(&view, DType::F32, &Device::Cpu)?;
                assert_eq!(t.dims(), &[cols, rows]);
                assert_eq!(t.to_vec2::<f32>()?, want.to_vec2::<f32>()?, "{shape:?}");
                // Other dtypes take candle's conversion, transposed the same way.
                let h = load_view_transposed(&view, DType::F16, &Device::Cpu)?;
                assert_eq!(h.dims(), &[cols, rows]);
                let back = h.to_dtype(DType::F32)?;
                assert_eq!(back.to_vec2::<f32>()?, want.to_vec2::<f32>()?);
            }
        }
        let v = TensorView::new(safetensors::Dtype::F32, vec![2, 3, 2], &[0u8; 48]).expect("view");
        assert!(load_view_transposed(&v, DType::F32, &Device::Cpu).is_err());
        Ok(())
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn released_pages_leave_the_resident_set_and_read_back_unchanged() {
        use std::io::Write;
        let dir = std::env::temp_dir().join(format!("sdserve-weights-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pages.bin");
        let len = 64 << 20;
        let content: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&content)
            .unwrap();
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: a read-only mapping of a file nobody modifies during the test.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        let before = rss_kb();
        let sum: u64 = map.iter().step_by(4096).map(|&b| b as u64).sum();
        let touched = rss_kb();
        assert!(touched >= before + 48 * 1024, "{before} -> {touched} kB");
        // SAFETY: `map` is a read-only file mapping.
        unsafe { release_mapped(&map[..]) };
        let released = rss_kb();
        assert!(
            released + 48 * 1024 <= touched,
            "{touched} -> {released} kB"
        );
        assert_eq!(
            sum,
            map.iter().step_by(4096).map(|&b| b as u64).sum::<u64>()
        );
        assert!(map[..] == content[..]);
        drop(map);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
