//! Grouped convolutions (ResNeXt's 3x3s of 32 groups) on the CPU. In NCHW each image's group is
//! a contiguous run of channels, in the input and in the output, and in OIHW the group's filters
//! are contiguous too: every group runs the plain kernels ([`super::conv2d_f32`]) on its own
//! slices, with no copy of the input's channels nor a concatenation of the outputs, and the
//! groups spread over the rayon pool (each group's conv is small: 8 to 64 channels).

use rayon::prelude::*;

use super::{conv2d_f32, ConvShape};

/// `out = conv2d(x, weight, groups) + bias`: `s` is the whole conv's shape (`cin` and `cout`
/// over all groups), `weight` OIHW `[cout, cin / groups, kh, kw]`, `x` and `out` contiguous
/// NCHW.
pub fn grouped_conv2d_f32(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    s: &ConvShape,
    groups: usize,
    out: &mut [f32],
) {
    assert!(
        groups > 0 && s.cin.is_multiple_of(groups) && s.cout.is_multiple_of(groups),
        "{groups} groups do not divide {} and {} channels",
        s.cin,
        s.cout
    );
    let group = ConvShape {
        batch: 1,
        cin: s.cin / groups,
        cout: s.cout / groups,
        ..*s
    };
    let (in_len, out_len) = (group.cin * s.h * s.w, group.cout * s.out_h() * s.out_w());
    let filters = group.cout * group.cin * s.kh * s.kw;
    assert_eq!(x.len(), s.batch * s.cin * s.h * s.w, "conv input size");
    assert_eq!(weight.len(), groups * filters, "conv weight size");
    assert_eq!(out.len(), s.batch * groups * out_len, "conv output size");
    out.par_chunks_mut(out_len)
        .enumerate()
        .for_each(|(task, out)| {
            // Tasks run image by image, group by group: the output's own order.
            let g = task % groups;
            let x = &x[task * in_len..][..in_len];
            let w = &weight[g * filters..][..filters];
            let b = bias.map(|b| &b[g * group.cout..][..group.cout]);
            conv2d_f32(x, w, b, &group, out);
        });
}
