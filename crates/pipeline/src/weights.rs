//! Reading weights out of memory-mapped safetensors files without holding them twice.
//!
//! candle's CPU tensors own their storage, so every weight is copied out of the mapping (or, on
//! a GPU, uploaded from it). A mapped page that was read stays in the process's resident set
//! until the mapping goes away, so loading a component used to hold its whole file twice: the
//! mapped pages and the copies (the UNet: 3.4 GB + 3.4 GB). Here each tensor's pages are given
//! back (`MADV_DONTNEED`) as soon as the tensor is copied; they stay in the OS page cache, so the
//! next start still reads them from memory. A load then peaks at the weights plus about one
//! tensor. The copy itself runs in parallel chunks (page faults of the new memory included).

use std::mem::MaybeUninit;
use std::path::Path;

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use safetensors::tensor::TensorView;

/// Bytes per parallel copy task.
const COPY_CHUNK: usize = 4 << 20;

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

/// Little-endian f32 bytes (any alignment) into a new vector, in parallel chunks.
fn copy_f32(bytes: &[u8]) -> Vec<f32> {
    let n = bytes.len() / 4;
    let mut v: Vec<f32> = Vec::with_capacity(n);
    let per_task = COPY_CHUNK / 4;
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(per_task)
        .zip(bytes[..n * 4].par_chunks(COPY_CHUNK))
        .for_each(|(dst, src): (&mut [MaybeUninit<f32>], &[u8])| {
            // SAFETY: `dst` has room for `src.len() / 4` f32s, the two do not overlap, and any
            // 4 bytes are a valid f32 (little-endian, as safetensors stores them).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    src.as_ptr(),
                    dst.as_mut_ptr().cast::<u8>(),
                    src.len(),
                )
            }
        });
    // SAFETY: all `n` elements were written above.
    unsafe { v.set_len(n) };
    v
}

/// Gives the pages under `data` back to the OS: they leave this process's resident set and
/// stay in the page cache; reading `data` again faults them back in from there.
///
/// # Safety
/// `data` must lie inside a read-only mapping of a file (never anonymous or heap memory, which
/// `MADV_DONTNEED` would zero). Whole pages around it are released, which is harmless for the
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
