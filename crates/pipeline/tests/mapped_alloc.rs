//! The allocator that lets tensors live in mapped weight files (`weights::mapped`), installed
//! as this test binary's global allocator: a buffer handed out of a mapping is freed into it,
//! the last one unmaps the file, `realloc` copies out, writes never reach the file, many
//! mappings and concurrent drops keep the count right, and a full table falls back to copies.

#[path = "integration/common/mod.rs"]
mod common;

use common::ScratchDir;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device};
use sdserve_pipeline::pipeline::StableDiffusion;
use sdserve_pipeline::weights::mapped::{installed, MappedAlloc, MappedFile};

#[global_allocator]
static ALLOC: MappedAlloc = MappedAlloc;

/// The tests share one table of mappings: one at a time, so the full-table test sees only its
/// own.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A file of `n` f32s `base, base + 1, ..` after `pad` bytes.
fn write_floats(path: &Path, pad: usize, base: f32, n: usize) -> Vec<u8> {
    let mut bytes = vec![0xA5u8; pad];
    for i in 0..n {
        bytes.extend_from_slice(&(base + i as f32).to_le_bytes());
    }
    std::fs::write(path, &bytes).unwrap();
    bytes
}

/// Whether `path` is mapped in this process now.
fn is_mapped(path: &Path) -> bool {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let name = path.to_str().unwrap();
    maps.lines().any(|l| l.ends_with(name))
}

#[test]
fn the_binary_installs_it() {
    let v: Box<[u8]> = std::hint::black_box(vec![1u8; 16]).into_boxed_slice();
    assert!(installed() && v.len() == 16);
}

#[test]
fn the_last_buffer_dropped_unmaps_the_file() {
    let _g = serial();
    let dir = ScratchDir::new("mapped-drop");
    let path = dir.0.join("w.bin");
    write_floats(&path, 8, 0.0, 4096);
    let file = MappedFile::open(&path).unwrap();
    assert!(file.is_registered());
    // SAFETY: disjoint ranges, each handed out once.
    let (a, b) = unsafe { (file.vec_f32(8, 1000), file.vec_f32(8 + 4000, 3096)) };
    let (a, b) = (a.expect("in the mapping"), b.expect("in the mapping"));
    assert_eq!(a[..3], [0.0, 1.0, 2.0]);
    assert_eq!(b[0], 1000.0);
    assert_eq!(*b.last().unwrap(), 4095.0);
    // The buffers are the mapping itself, not copies.
    assert_eq!(a.as_ptr().cast::<u8>(), file.bytes()[8..].as_ptr());
    drop(file);
    assert!(is_mapped(&path), "the buffers keep the mapping");
    drop(a);
    assert!(is_mapped(&path));
    assert_eq!(b[5], 1005.0);
    drop(b);
    assert!(!is_mapped(&path), "the last buffer unmaps");

    // The handle alone, and a handle outliving its buffers.
    let file = MappedFile::open(&path).unwrap();
    // SAFETY: handed out once.
    drop(unsafe { file.vec_f32(8, 10) }.unwrap());
    assert!(is_mapped(&path));
    drop(file);
    assert!(!is_mapped(&path));
}

#[test]
fn misaligned_out_of_bounds_or_empty_ranges_are_refused() {
    let _g = serial();
    let dir = ScratchDir::new("mapped-bounds");
    let path = dir.0.join("w.bin");
    write_floats(&path, 8, 0.0, 16);
    let file = MappedFile::open(&path).unwrap();
    // SAFETY: nothing is handed out by these calls.
    unsafe {
        assert!(file.vec_f32(9, 2).is_none(), "misaligned");
        assert!(file.vec_f32(8, 17).is_none(), "past the end");
        assert!(file.vec_f32(8, 0).is_none(), "empty");
        assert!(file.vec_f32(usize::MAX - 3, 1).is_none(), "overflow");
    }
    drop(file);
    assert!(!is_mapped(&path));
}

#[test]
fn realloc_copies_out_and_writes_never_reach_the_file() {
    let _g = serial();
    let dir = ScratchDir::new("mapped-write");
    let path = dir.0.join("w.bin");
    let original = write_floats(&path, 8, 10.0, 8192);
    let file = MappedFile::open(&path).unwrap();
    // SAFETY: disjoint ranges, each handed out once.
    let (mut a, mut b) = unsafe { (file.vec_f32(8, 4096), file.vec_f32(8 + 4 * 4096, 4096)) };
    let (a, b) = (a.as_mut().unwrap(), b.as_mut().unwrap());
    // In place (a LoRA merge): the page is copied for this process.
    a[0] = -1.0;
    a[4095] = -2.0;
    assert_eq!(a[0], -1.0);
    assert_eq!(file.bytes()[8..12], (-1.0f32).to_le_bytes());
    // Growing: realloc moves it out of the mapping, values kept, the mapping's count dropped.
    b[1] = -3.0;
    b.push(99.0);
    assert_ne!(
        b.as_ptr().cast::<u8>(),
        file.bytes()[8 + 4 * 4096..].as_ptr()
    );
    assert_eq!((b[0], b[1], b[4095], b[4096]), (4106.0, -3.0, 8201.0, 99.0));
    // Shrinking to a smaller allocation copies out too.
    let a_moved = std::mem::take(a);
    let mut a_small = a_moved;
    a_small.truncate(10);
    a_small.shrink_to_fit();
    assert_eq!(a_small[..2], [-1.0, 11.0]);
    drop(file);
    assert!(!is_mapped(&path), "both buffers left the mapping");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        original,
        "the file is unchanged"
    );
    // A new mapping reads the file's values, not this process's writes.
    let file = MappedFile::open(&path).unwrap();
    assert_eq!(file.bytes(), &original[..]);
}

#[test]
fn many_mappings_and_concurrent_drops_keep_each_count() {
    let _g = serial();
    let dir = ScratchDir::new("mapped-many");
    let mut files = Vec::new();
    let mut bufs = Vec::new();
    for f in 0..12 {
        let path = dir.0.join(format!("w{f}.bin"));
        write_floats(&path, 8, f as f32 * 1e4, 2048);
        let file = MappedFile::open(&path).unwrap();
        for j in 0..32 {
            // SAFETY: disjoint 64-float ranges, each handed out once.
            let v = unsafe { file.vec_f32(8 + j * 256, 64) }.expect("registered");
            bufs.push((f, j, v));
        }
        files.push((path, file));
    }
    // The handles go first; then 4 threads drop the buffers of every file, interleaved.
    let paths: Vec<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
    drop(files);
    assert!(paths.iter().all(|p| is_mapped(p)));
    let mut per_thread: Vec<Vec<_>> = (0..4).map(|_| Vec::new()).collect();
    for (i, b) in bufs.into_iter().enumerate() {
        per_thread[i % 4].push(b);
    }
    std::thread::scope(|s| {
        for bufs in per_thread {
            s.spawn(move || {
                for (f, j, v) in bufs {
                    assert_eq!(v[0], f as f32 * 1e4 + (j * 64) as f32);
                    // Allocations of the system interleaved with frees into mappings.
                    let other = vec![f as u64; 1000];
                    drop(v);
                    assert_eq!(other[999], f as u64);
                }
            });
        }
    });
    for p in &paths {
        assert!(!is_mapped(p), "{} still mapped", p.display());
    }
}

#[test]
fn a_full_table_falls_back_to_unregistered_mappings() {
    let _g = serial();
    let dir = ScratchDir::new("mapped-full");
    let mut files = Vec::new();
    for f in 0..80 {
        let path = dir.0.join(format!("w{f}.bin"));
        write_floats(&path, 8, 0.0, 16);
        files.push(MappedFile::open(&path).unwrap());
    }
    let registered = files.iter().filter(|f| f.is_registered()).count();
    assert!(
        (32..80).contains(&registered),
        "{registered} of 80 registered"
    );
    let last = files.last().unwrap();
    assert!(!last.is_registered());
    // SAFETY: handed out once (it is refused).
    assert!(unsafe { last.vec_f32(8, 4) }.is_none());
    assert_eq!(last.bytes()[8..12], 0f32.to_le_bytes());
    drop(files);
    // Room again.
    let path = dir.0.join("w0.bin");
    let file = MappedFile::open(&path).unwrap();
    assert!(file.is_registered());
}

/// A model loaded for an f32 CPU keeps its weight files mapped (tensors live in them) until it
/// is dropped, and its images are those of a copy (`pipeline_images` checks them against
/// diffusers with this allocator installed too).
#[test]
fn a_loaded_model_lives_in_its_files_until_dropped() {
    let _g = serial();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-a");
    let files = [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ]
    .map(|f| dir.join(f));
    assert!(files.iter().all(|f| f.exists() && !is_mapped(f)));
    let model = StableDiffusion::load(&dir, &Device::Cpu, DType::F32).expect("loads");
    for f in &files {
        assert!(is_mapped(f), "{} not mapped after loading", f.display());
    }
    drop(model);
    for f in &files {
        assert!(!is_mapped(f), "{} still mapped", f.display());
    }
}

/// A linear weight loaded from its mapped file stays there until its transpose is first asked
/// for; the transpose equals the one made from a copy, and once made (and the loader gone) the
/// file is no longer mapped: nothing holds the stored weight.
#[test]
fn a_linear_weight_is_transposed_at_first_use_then_leaves_the_mapping() {
    use sdserve_pipeline::kernels::linear::Dense;
    let _g = serial();
    let dev = Device::Cpu;
    let dir = ScratchDir::new("mapped-dense");
    let path = dir.0.join("w.safetensors");
    let w = candle_core::Tensor::randn(0f32, 1.0, (300, 200), &dev).unwrap();
    let ts = std::collections::HashMap::from([("a.weight".to_string(), w.clone())]);
    candle_core::safetensors::save(&ts, &path).unwrap();
    let vb = sdserve_pipeline::single_file::checked_var_builder(
        std::slice::from_ref(&path),
        DType::F32,
        &dev,
    )
    .unwrap();
    let dense = Dense::load(200, 300, false, vb.pp("a")).unwrap();
    assert!(matches!(dense, Dense::Deferred { .. }), "{dense:?}");
    assert_eq!(dense.out_in_dims(), (300, 200));
    drop(vb);
    assert!(is_mapped(&path), "the stored weight lives in the file");
    let x = candle_core::Tensor::randn(0f32, 1.0, (7, 200), &dev).unwrap();
    let want = x.matmul(&w.t().unwrap()).unwrap();
    let got = dense.forward(&x, None).unwrap();
    let diff = common::max_abs_diff(&got, &want);
    assert!(diff < 1e-4, "{diff}");
    let (wt, _) = dense.transposed().unwrap().expect("transposed");
    assert_eq!(
        wt.to_vec2::<f32>().unwrap(),
        w.t()
            .unwrap()
            .contiguous()
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    );
    assert!(!is_mapped(&path), "the transpose is the layer's only copy");
}
