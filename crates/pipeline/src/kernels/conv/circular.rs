//! Circular padding (A1111's `tiling`): a per-thread switch every [`super::Conv2d`] reads,
//! and the wrap it pads with.

use std::cell::Cell;

use candle_core::{Result, Tensor};

thread_local! {
    /// Whether [`super::Conv2d`]s on this thread pad circularly (see [`circular_padding`]).
    static CIRCULAR: Cell<bool> = const { Cell::new(false) };
}

/// Switches circular padding on or off for every [`super::Conv2d`] run on this thread until the guard
/// drops (also while unwinding from a panic), when the setting goes back to what it was.
/// A1111's `tiling` (seamless textures) sets torch's `padding_mode="circular"` on every Conv2d of
/// the UNet and the VAE for one run; a run-scoped setting does the same without threading a flag
/// through every forward. Per thread, because a pipeline runs on its caller's thread and other
/// threads may run other requests meanwhile.
#[must_use = "circular padding ends when the guard drops"]
pub fn circular_padding(on: bool) -> CircularPadding {
    CircularPadding {
        previous: CIRCULAR.with(|c| c.replace(on)),
    }
}

/// Whether circular padding is on for this thread (see [`circular_padding`]).
pub fn circular_padding_on() -> bool {
    CIRCULAR.with(Cell::get)
}

/// Restores the thread's padding mode when dropped; from [`circular_padding`].
#[derive(Debug)]
pub struct CircularPadding {
    previous: bool,
}

impl Drop for CircularPadding {
    fn drop(&mut self) {
        CIRCULAR.with(|c| c.set(self.previous));
    }
}

/// `x` (`[B, C, H, W]`) with `p` rows and columns of the opposite edge added on each side:
/// torch's `F.pad(x, (p, p, p, p), mode="circular")`, which a circular-mode Conv2d applies before
/// convolving with padding 0. Plain tensor ops, so it runs on every device.
pub fn wrap_pad(x: &Tensor, p: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if p > h || p > w {
        candle_core::bail!("circular padding {p} is larger than the input {h}x{w}");
    }
    let x = Tensor::cat(&[&x.narrow(3, w - p, p)?, x, &x.narrow(3, 0, p)?], 3)?;
    Tensor::cat(&[&x.narrow(2, h - p, p)?, &x, &x.narrow(2, 0, p)?], 2)
}
