//! The source of sdserve's CUDA kernels: the files of `cu/`, concatenated in name order into one
//! NVRTC translation unit (no `#include`, so no CUDA headers are needed where sdserve runs). The
//! tools that compile it outside sdserve (tools/kernels_ptx.py, tools/nvrtc_check.py,
//! tools/cuda_on_cpu, scripts/sm61-ptx.sh) concatenate `cu/*.cu` the same way; a test keeps the
//! list below equal to the folder.

/// kernels.cu: the parts in order (prelude first: the f16 conversions and reductions the
/// others use).
pub const SOURCE: &str = concat!(
    include_str!("cu/1_prelude.cu"),
    include_str!("cu/2_norms.cu"),
    include_str!("cu/3_attention_mma.cu"),
    include_str!("cu/4_attention_simt.cu"),
    include_str!("cu/5_attention_tiled.cu"),
    include_str!("cu/6_bias.cu"),
);

#[cfg(test)]
mod tests {
    /// The tools read `cu/*.cu` in name order: that must be exactly what sdserve compiles.
    #[test]
    fn source_is_every_part_of_the_folder_in_name_order() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/kernels/cuda/cu");
        let mut parts: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "cu"))
            .collect();
        parts.sort();
        assert!(parts.len() > 1, "{dir:?}");
        let joined: String = parts
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect();
        assert_eq!(joined, super::SOURCE, "cu/ and source.rs's list differ");
        assert!(super::SOURCE.contains("extern \"C\" __global__ void bias_rows_f32"));
    }
}
