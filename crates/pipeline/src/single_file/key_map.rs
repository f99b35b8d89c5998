//! LDM (CompVis) key names -> diffusers key names, for the UNet and the VAE.

const RESNET_UNET: [(&str, &str); 6] = [
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("emb_layers.1.", "time_emb_proj."),
    ("skip_connection.", "conv_shortcut."),
];

fn resnet_unet(rest: &str) -> Option<String> {
    RESNET_UNET
        .iter()
        .find_map(|(l, d)| rest.strip_prefix(l).map(|t| format!("{d}{t}")))
}

/// Splits `"<a>.<b>.<rest>"` into the two leading integers and the rest.
fn two_ints(s: &str) -> Option<(usize, usize, &str)> {
    let (a, s) = s.split_once('.')?;
    let (b, rest) = s.split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?, rest))
}

/// LDM UNet key (without `model.diffusion_model.`) -> diffusers key, for `layers` resnets per
/// down block (up blocks have `layers + 1`).
pub fn map_unet_key(k: &str, layers: usize) -> Option<String> {
    const SIMPLE: [(&str, &str); 5] = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ];
    if let Some(m) = SIMPLE
        .iter()
        .find_map(|(l, d)| k.strip_prefix(l).map(|t| format!("{d}{t}")))
    {
        return Some(m);
    }
    let per = layers + 1;
    if let Some(s) = k.strip_prefix("input_blocks.") {
        let (i, j, rest) = two_ints(s)?;
        if i == 0 {
            return None;
        }
        let (b, layer) = ((i - 1) / per, (i - 1) % per);
        return match j {
            0 if rest.starts_with("op.") => (layer == layers)
                .then(|| format!("down_blocks.{b}.downsamplers.0.conv.{}", &rest[3..])),
            0 if layer < layers => Some(format!(
                "down_blocks.{b}.resnets.{layer}.{}",
                resnet_unet(rest)?
            )),
            1 if layer < layers => Some(format!("down_blocks.{b}.attentions.{layer}.{rest}")),
            _ => None,
        };
    }
    if let Some(s) = k.strip_prefix("middle_block.") {
        let (i, rest) = s.split_once('.')?;
        return match i {
            "0" => Some(format!("mid_block.resnets.0.{}", resnet_unet(rest)?)),
            "1" => Some(format!("mid_block.attentions.0.{rest}")),
            "2" => Some(format!("mid_block.resnets.1.{}", resnet_unet(rest)?)),
            _ => None,
        };
    }
    if let Some(s) = k.strip_prefix("output_blocks.") {
        let (i, j, rest) = two_ints(s)?;
        let (b, layer) = (i / per, i % per);
        return match j {
            0 => Some(format!(
                "up_blocks.{b}.resnets.{layer}.{}",
                resnet_unet(rest)?
            )),
            1 | 2 if rest.starts_with("conv.") => {
                (layer == layers).then(|| format!("up_blocks.{b}.upsamplers.0.{rest}"))
            }
            1 => Some(format!("up_blocks.{b}.attentions.{layer}.{rest}")),
            _ => None,
        };
    }
    None
}

/// LDM VAE key (without `first_stage_model.`) -> diffusers key, for `n` resolution levels.
pub fn map_vae_key(k: &str, n: usize) -> Option<String> {
    let (side, rest) = k.split_once('.')?;
    if side == "quant_conv" || side == "post_quant_conv" {
        return Some(k.to_string());
    }
    if side != "encoder" && side != "decoder" {
        return None;
    }
    let resnet = |r: &str| r.replacen("nin_shortcut.", "conv_shortcut.", 1);
    if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        return Some(k.to_string());
    }
    if let Some(t) = rest.strip_prefix("norm_out.") {
        return Some(format!("{side}.conv_norm_out.{t}"));
    }
    let level = if side == "encoder" { "down." } else { "up." };
    if let Some(s) = rest.strip_prefix(level) {
        let (i, s) = s.split_once('.')?;
        let i: usize = i.parse().ok()?;
        if i >= n {
            return None;
        }
        // LDM numbers decoder levels from the lowest resolution up; diffusers the other way.
        let bi = if side == "encoder" { i } else { n - 1 - i };
        let blocks = if side == "encoder" {
            "down_blocks"
        } else {
            "up_blocks"
        };
        if let Some(s) = s.strip_prefix("block.") {
            let (j, t) = s.split_once('.')?;
            let j: usize = j.parse().ok()?;
            return Some(format!("{side}.{blocks}.{bi}.resnets.{j}.{}", resnet(t)));
        }
        let samp = if side == "encoder" {
            "downsample.conv."
        } else {
            "upsample.conv."
        };
        let samplers = if side == "encoder" {
            "downsamplers"
        } else {
            "upsamplers"
        };
        return s
            .strip_prefix(samp)
            .map(|t| format!("{side}.{blocks}.{bi}.{samplers}.0.conv.{t}"));
    }
    if let Some(s) = rest.strip_prefix("mid.") {
        if let Some(t) = s.strip_prefix("block_1.") {
            return Some(format!("{side}.mid_block.resnets.0.{}", resnet(t)));
        }
        if let Some(t) = s.strip_prefix("block_2.") {
            return Some(format!("{side}.mid_block.resnets.1.{}", resnet(t)));
        }
        if let Some(t) = s.strip_prefix("attn_1.") {
            let (name, param) = t.split_once('.')?;
            let new = match name {
                "norm" => "group_norm",
                "q" => "to_q",
                "k" => "to_k",
                "v" => "to_v",
                "proj_out" => "to_out.0",
                _ => return None,
            };
            return Some(format!("{side}.mid_block.attentions.0.{new}.{param}"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unet_keys_follow_diffusers_layout() {
        let l = 2;
        let cases = [
            ("time_embed.0.weight", "time_embedding.linear_1.weight"),
            ("input_blocks.0.0.bias", "conv_in.bias"),
            (
                "input_blocks.1.0.in_layers.0.weight",
                "down_blocks.0.resnets.0.norm1.weight",
            ),
            (
                "input_blocks.2.1.proj_in.weight",
                "down_blocks.0.attentions.1.proj_in.weight",
            ),
            (
                "input_blocks.3.0.op.weight",
                "down_blocks.0.downsamplers.0.conv.weight",
            ),
            (
                "input_blocks.4.0.skip_connection.bias",
                "down_blocks.1.resnets.0.conv_shortcut.bias",
            ),
            (
                "middle_block.2.emb_layers.1.weight",
                "mid_block.resnets.1.time_emb_proj.weight",
            ),
            (
                "middle_block.1.transformer_blocks.0.attn1.to_q.weight",
                "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight",
            ),
            (
                "output_blocks.2.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.5.2.conv.bias",
                "up_blocks.1.upsamplers.0.conv.bias",
            ),
            (
                "output_blocks.5.1.norm.weight",
                "up_blocks.1.attentions.2.norm.weight",
            ),
            (
                "output_blocks.3.0.out_layers.3.weight",
                "up_blocks.1.resnets.0.conv2.weight",
            ),
            ("out.2.weight", "conv_out.weight"),
        ];
        for (ldm, want) in cases {
            assert_eq!(map_unet_key(ldm, l).as_deref(), Some(want), "{ldm}");
        }
        assert_eq!(map_unet_key("input_blocks.1.0.op.weight", l), None);
        assert_eq!(map_unet_key("label_emb.0.0.weight", l), None);
    }

    #[test]
    fn vae_keys_follow_diffusers_layout() {
        let cases = [
            (
                "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "encoder.down.0.downsample.conv.bias",
                "encoder.down_blocks.0.downsamplers.0.conv.bias",
            ),
            (
                "decoder.up.0.block.2.conv1.weight",
                "decoder.up_blocks.3.resnets.2.conv1.weight",
            ),
            (
                "decoder.up.3.upsample.conv.weight",
                "decoder.up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "decoder.mid.attn_1.proj_out.weight",
                "decoder.mid_block.attentions.0.to_out.0.weight",
            ),
            (
                "encoder.mid.block_2.norm1.bias",
                "encoder.mid_block.resnets.1.norm1.bias",
            ),
            ("decoder.norm_out.weight", "decoder.conv_norm_out.weight"),
            ("post_quant_conv.bias", "post_quant_conv.bias"),
        ];
        for (ldm, want) in cases {
            assert_eq!(map_vae_key(ldm, 4).as_deref(), Some(want), "{ldm}");
        }
        assert_eq!(map_vae_key("decoder.up.4.block.0.conv1.weight", 4), None);
    }
}
