//! Tests of the weight reading: resident memory after loads and discards, sampled copies,
//! transposed loads.

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
        let view = TensorView::new(safetensors::Dtype::F32, vec![vals.len()], data).expect("view");
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
            let view = TensorView::new(safetensors::Dtype::F32, shape.clone(), data).expect("view");
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

#[test]
fn adapter_scans_list_only_their_extensions() {
    let dir = std::env::temp_dir().join(format!("sdserve-scan-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("sub.safetensors")).unwrap();
    for f in ["a.safetensors", "b.pt", "c.txt", "d.bin", "e"] {
        std::fs::write(dir.join(f), b"").unwrap();
    }
    let names = |exts: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = files_with_extension(&dir, exts)
            .unwrap()
            .map(|p| {
                p.unwrap()
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        v.sort();
        v
    };
    // A folder named like a weight file is listed too: reading it then fails, naming it.
    assert_eq!(
        names(&["safetensors"]),
        ["a.safetensors", "sub.safetensors"]
    );
    assert_eq!(
        names(&["pt", "bin", "safetensors"]),
        ["a.safetensors", "b.pt", "d.bin", "sub.safetensors"]
    );
    std::fs::remove_dir_all(&dir).unwrap();
    let err = files_with_extension(&dir, &["pt"])
        .err()
        .expect("no such folder");
    assert!(err.to_string().contains("sdserve-scan-"), "{err}");
}
