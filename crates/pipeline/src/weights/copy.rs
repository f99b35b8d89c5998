//! f32 copies out of a mapped file: parallel chunks with their pages populated up front, the
//! NaN/Inf sample taken in cache, and the blocked transposed copy.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::page_size;

/// Bytes per parallel copy task.
const COPY_CHUNK: usize = 4 << 20;

/// `bytes` as f32s when they are 4-byte aligned (safetensors pads its header to 8, so the data
/// of a mapped file normally is); `None` otherwise.
pub(super) fn bytemuck_f32(bytes: &[u8]) -> Option<&[f32]> {
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
pub(super) fn copy_f32(bytes: &[u8]) -> Vec<f32> {
    copy_f32_sampled(bytes, false).0
}

/// As [`copy_f32`]; with `sample`, also the index of the first NaN or Inf among the elements
/// `0, step, 2 * step, ..` and the last (`single_file::finite_sample_step`), looked at in each
/// chunk as soon as it is written.
pub(super) fn copy_f32_sampled(bytes: &[u8], sample: bool) -> (Vec<f32>, Option<usize>) {
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

/// `n` little-endian f32s read from `path` at byte `offset` (a pickle checkpoint's contiguous
/// tensor) straight into a new vector: parallel positioned reads of [`COPY_CHUNK`] bytes into
/// pages populated up front, with no intermediate buffer, so the tensor is in memory once.
pub(crate) fn read_f32_at(
    path: &std::path::Path,
    offset: u64,
    n: usize,
) -> std::io::Result<Vec<f32>> {
    let file = std::fs::File::open(path)?;
    let mut v: Vec<f32> = Vec::with_capacity(n);
    let per_task = COPY_CHUNK / 4;
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(per_task)
        .enumerate()
        .try_for_each(|(ci, dst): (usize, &mut [MaybeUninit<f32>])| {
            prefault(dst);
            // SAFETY: `dst` is `dst.len() * 4` writable bytes; any 4 bytes are a valid f32.
            let bytes = unsafe {
                std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<u8>(), dst.len() * 4)
            };
            read_exact_at(&file, path, bytes, offset + (ci * COPY_CHUNK) as u64)
        })?;
    // SAFETY: every chunk was read in full above (an error returned early).
    unsafe { v.set_len(n) };
    Ok(v)
}

/// Fills `buf` from `file` at `offset`, from several threads at once.
#[cfg(unix)]
fn read_exact_at(
    file: &std::fs::File,
    _path: &std::path::Path,
    buf: &mut [u8],
    offset: u64,
) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

/// Fills `buf` from `path` at `offset` through a handle of its own (no positioned reads here).
#[cfg(not(unix))]
fn read_exact_at(
    _file: &std::fs::File,
    path: &std::path::Path,
    buf: &mut [u8],
    offset: u64,
) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(buf)
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
