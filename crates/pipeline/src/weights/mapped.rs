//! Tensors whose storage is the mapped weight file itself, through the global allocator.
//!
//! candle's CPU tensors own a `Vec<T>`, so a weight used to be copied out of its mapped file:
//! 4 GB of fresh pages for SD 1.5, each zeroed by the kernel and then filled by the copy, where
//! diffusers (torch tensors pointing into safetensors' mapping) pays neither. [`MappedAlloc`], a
//! global allocator over [`System`], can also own regions that are private, writable mappings of
//! files: [`MappedFile::vec_f32`] hands out a `Vec<f32>` whose buffer lies inside such a
//! mapping, and the allocator's `dealloc` recognises it (a fixed table of mappings, read with
//! atomics and no allocation), counts it off, and unmaps the file when its last tensor (and the
//! [`MappedFile`] itself) are gone. `realloc` of such a buffer copies it out to `System` memory.
//!
//! Why `Vec::from_raw_parts` on such a pointer is sound: it requires memory "allocated by the
//! global allocator" with the Vec's layout. When [`installed`] is true the global allocator IS
//! [`MappedAlloc`], which owns the registered mappings: it handed the region out, its `dealloc`
//! and `realloc` accept any layout inside it (they never pass such a pointer to `System`), and
//! the mapping stays mapped while any buffer in it is alive. Each region is handed out once
//! (the caller's duty, see [`MappedFile::vec_f32`]), so no two Vecs alias. The mapping is
//! `MAP_PRIVATE` with `PROT_WRITE`: a write through the Vec (a LoRA merged in place) copies the
//! page for this process and never reaches the file. When the allocator is not installed (unit
//! tests, other users of the library) [`MappedFile::vec_f32`] answers `None` and callers copy.
//!
//! The exposure mapping brings (diffusers has the same one): if the file is truncated while the
//! process runs, reading a page past the new end raises SIGBUS. Replacing the file (a new inode,
//! as downloads and `cp` to a temporary name then `mv` do) is safe: the mapping keeps the old one.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

/// The global allocator that can own file mappings. Install it in a binary with
/// `#[global_allocator] static A: MappedAlloc = MappedAlloc;` (or wrap it in another allocator
/// that forwards every call to it).
pub struct MappedAlloc;

/// Set by the first allocation through [`MappedAlloc`]: only then is it the global allocator.
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Mappings that can be registered at once (one per weight file being loaded or in use).
const SLOTS: usize = 64;

/// A registered mapping: `start` is 0 when free, [`RESERVED`] while being filled in.
struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    /// Buffers handed out plus one for the [`MappedFile`] handle.
    refs: AtomicUsize,
}

const RESERVED: usize = 1;

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    refs: AtomicUsize::new(0),
};
static TABLE: [Slot; SLOTS] = [FREE; SLOTS];
/// Slots ever used (the lookup scans `TABLE[..USED]`).
static USED: AtomicUsize = AtomicUsize::new(0);
/// Mappings registered now; 0 makes `dealloc` skip the table.
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// Whether [`MappedAlloc`] is this process's global allocator (it has served an allocation).
pub fn installed() -> bool {
    INSTALLED.load(SeqCst)
}

/// Whether weights may live in their mapped files: the allocator is installed and
/// `SDSERVE_WEIGHTS=copy` (every weight copied at load, as without the allocator: for A/B runs,
/// or where model files may be rewritten in place under a running server) is not set.
pub fn enabled() -> bool {
    use std::sync::OnceLock;
    static COPY: OnceLock<bool> = OnceLock::new();
    installed() && !*COPY.get_or_init(|| std::env::var("SDSERVE_WEIGHTS").as_deref() == Ok("copy"))
}

/// Whether `p` points into a registered mapping (a buffer [`MappedFile::vec_f32`] handed out).
pub fn in_mapping(p: *const u8) -> bool {
    find(p.cast_mut()).is_some()
}

/// The slot whose mapping holds `p`, if any.
fn find(p: *mut u8) -> Option<usize> {
    if LIVE.load(SeqCst) == 0 {
        return None;
    }
    let p = p as usize;
    let used = USED.load(SeqCst).min(SLOTS);
    (0..used).find(|&i| {
        let start = TABLE[i].start.load(SeqCst);
        start > RESERVED && p >= start && p < start + TABLE[i].len.load(SeqCst)
    })
}

/// Drops one reference to slot `i`'s mapping; the last one unregisters and unmaps it.
fn release(i: usize) {
    let slot = &TABLE[i];
    if slot.refs.fetch_sub(1, SeqCst) != 1 {
        return;
    }
    let start = slot.start.load(SeqCst);
    let len = slot.len.load(SeqCst);
    // Unregistered before the range is unmapped, so no later allocation the system makes in
    // it can be taken for ours.
    slot.start.store(0, SeqCst);
    LIVE.fetch_sub(1, SeqCst);
    unmap(start, len);
}

/// Registers `[start, start + len)` with one reference; `None` when the table is full.
fn register(start: usize, len: usize) -> Option<usize> {
    for (i, slot) in TABLE.iter().enumerate() {
        if slot
            .start
            .compare_exchange(0, RESERVED, SeqCst, SeqCst)
            .is_ok()
        {
            slot.len.store(len, SeqCst);
            slot.refs.store(1, SeqCst);
            USED.fetch_max(i + 1, SeqCst);
            LIVE.fetch_add(1, SeqCst);
            slot.start.store(start, SeqCst);
            return Some(i);
        }
    }
    None
}

// SAFETY: allocations are `System`'s, unchanged; a pointer inside a registered mapping (which
// `System` never handed out, as the range was mapped by us) is never passed to `System`.
unsafe impl GlobalAlloc for MappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !INSTALLED.load(std::sync::atomic::Ordering::Relaxed) {
            INSTALLED.store(true, SeqCst);
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !INSTALLED.load(std::sync::atomic::Ordering::Relaxed) {
            INSTALLED.store(true, SeqCst);
        }
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match find(ptr) {
            Some(i) => release(i),
            None => unsafe { System.dealloc(ptr, layout) },
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Some(i) = find(ptr) else {
            return unsafe { System.realloc(ptr, layout, new_size) };
        };
        // Out of the mapping into ordinary memory; the mapped buffer is then given up.
        // SAFETY: `realloc`'s contract gives a valid size for `layout.align()`.
        let new =
            unsafe { System.alloc(Layout::from_size_align_unchecked(new_size, layout.align())) };
        if !new.is_null() {
            // SAFETY: both hold at least the smaller size; distinct allocations.
            unsafe { std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
            release(i);
        }
        new
    }
}

/// A whole file mapped private and writable (pages copied on write, never written back). When
/// [`MappedAlloc`] is installed the mapping is registered with it, and [`Self::vec_f32`] can hand
/// out buffers in it; the mapping then lives until this handle and every such buffer are gone.
pub struct MappedFile {
    ptr: *mut u8,
    len: usize,
    /// The allocator's slot, when registered.
    slot: Option<usize>,
}

// SAFETY: the handle only reads the mapping and counts references with atomics.
unsafe impl Send for MappedFile {}
unsafe impl Sync for MappedFile {}

impl MappedFile {
    /// Maps `path`. The caller must not truncate the file while it is mapped (see the module
    /// documentation).
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = std::fs::File::open(path)?;
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| io::Error::other("file too large to map"))?;
        if len == 0 {
            return Ok(Self {
                ptr: std::ptr::NonNull::dangling().as_ptr(),
                len: 0,
                slot: None,
            });
        }
        let ptr = map(&file, len)?;
        let slot = if enabled() {
            register(ptr as usize, len)
        } else {
            None
        };
        Ok(Self { ptr, len, slot })
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: mapped (or dangling with length 0) for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Whether buffers can be handed out of this mapping (the allocator is installed and
    /// had room for it).
    pub fn is_registered(&self) -> bool {
        self.slot.is_some()
    }

    /// The `n` f32s at byte `offset` as a `Vec` whose buffer is the mapping itself (no copy),
    /// when the mapping is registered, the range is in bounds, 4-byte aligned and not empty;
    /// `None` otherwise (copy instead).
    ///
    /// # Safety
    /// No other live buffer may overlap `[offset, offset + 4 n)`: each range is handed out at
    /// most once, or two Vecs would alias.
    pub unsafe fn vec_f32(&self, offset: usize, n: usize) -> Option<Vec<f32>> {
        let slot = self.slot?;
        let end = offset.checked_add(n.checked_mul(4)?)?;
        if n == 0 || end > self.len {
            return None;
        }
        // SAFETY: in bounds (checked above).
        let p = unsafe { self.ptr.add(offset) };
        if !(p as usize).is_multiple_of(std::mem::align_of::<f32>()) {
            return None;
        }
        TABLE[slot].refs.fetch_add(1, SeqCst);
        // SAFETY: the global allocator owns this region and accepts it in `dealloc` (module
        // documentation); it stays mapped while the Vec holds its reference; aligned, in
        // bounds, initialised (file bytes), any bits a valid f32; not aliased (the caller).
        Some(unsafe { Vec::from_raw_parts(p.cast::<f32>(), n, n) })
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        match self.slot {
            Some(i) => release(i),
            None if self.len > 0 => unmap(self.ptr as usize, self.len),
            None => {}
        }
    }
}

#[cfg(unix)]
fn map(file: &std::fs::File, len: usize) -> io::Result<*mut u8> {
    use std::os::fd::AsRawFd;
    // SAFETY: a fresh mapping of an open file; the kernel picks the address.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
            file.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p.cast())
}

#[cfg(unix)]
fn unmap(start: usize, len: usize) {
    // SAFETY: a mapping this module made, with no buffer or handle left in it. A failure
    // leaves it mapped (a leak, not a fault).
    unsafe { libc::munmap(start as *mut libc::c_void, len) };
}

#[cfg(not(unix))]
fn map(file: &std::fs::File, len: usize) -> io::Result<*mut u8> {
    // No mmap here: the file read into leaked memory, freed by `unmap`.
    use std::io::Read;
    let mut v = Vec::with_capacity(len);
    (&*file).read_to_end(&mut v)?;
    Ok(Box::into_raw(v.into_boxed_slice()).cast())
}

#[cfg(not(unix))]
fn unmap(start: usize, len: usize) {
    // SAFETY: the box `map` leaked.
    drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(start as *mut u8, len)) });
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The library's unit tests run with the system allocator: nothing is handed out.
    #[test]
    fn without_the_allocator_nothing_is_handed_out() {
        let dir = std::env::temp_dir().join(format!("sdserve-mapped-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.bin");
        std::fs::write(&path, [0u8; 64]).unwrap();
        let m = MappedFile::open(&path).unwrap();
        assert!(!installed() && !m.is_registered());
        assert_eq!(m.bytes(), &[0u8; 64]);
        // SAFETY: nothing else handed out.
        assert!(unsafe { m.vec_f32(0, 4) }.is_none());
        drop(m);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
