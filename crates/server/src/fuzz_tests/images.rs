//! Request images (`init_image`, `mask_image`, A1111's `init_images`/`mask`, OpenAI's edit
//! files): random base64, `data:` prefixes, mutated real PNG/JPEG/WebP bytes, and headers built
//! to claim any size (valid checksums, tiny bodies). Properties: no panic; a rejection is a 422
//! naming the field; and, measured by a counting allocator on the decoding thread, no
//! allocation follows a size the header claims past the limits: such a file costs no more than
//! a small multiple of its own length, and no file costs more than the decoder's limit.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;

use axum::http::StatusCode;
use base64::Engine as _;
use proptest::prelude::*;
use sdserve_pipeline::weights::mapped::MappedAlloc as Inner;
use serde_json::json;

use super::cases;
use crate::images::{decode_base64, decode_bytes, MAX_PIXELS};

/// Counts the bytes this thread has allocated and not freed, and their peak, while tracking;
/// the allocations themselves are the binary's allocator's (weights in mapped files).
struct Counting;

thread_local! {
    /// (live bytes, peak) since tracking began; `None` when not tracking.
    static TRACK: Cell<Option<(isize, isize)>> = const { Cell::new(None) };
}

fn note(delta: isize) {
    let _ = TRACK.try_with(|t| {
        if let Some((live, peak)) = t.get() {
            let live = live + delta;
            t.set(Some((live, peak.max(live))));
        }
    });
}

// SAFETY: every call is forwarded to `Inner` unchanged; only a thread-local counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size() as isize);
        unsafe { Inner.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size() as isize);
        unsafe { Inner.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        note(-(l.size() as isize));
        unsafe { Inner.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        note(new as isize - l.size() as isize);
        unsafe { Inner.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// `f`'s result and the most bytes it held allocated at once (on this thread).
pub(crate) fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    TRACK.with(|t| t.set(Some((0, 0))));
    let out = f();
    let (_, peak) = TRACK.with(|t| t.replace(None)).unwrap();
    (out, peak.max(0) as usize)
}

/// The decoder's own ceiling (`images::decode_bytes` sets it before decoding).
const DECODER_LIMIT: usize = MAX_PIXELS as usize * 8 + (1 << 20);
/// What a file refused from its header may cost: its own bytes a few times over, plus the
/// decoders' fixed state (Huffman tables, the WebP decoder's buffers).
fn header_refusal_bound(len: usize) -> usize {
    4 * len + (256 << 10)
}

fn encoded(format: image::ImageFormat, w: u32, h: u32, alpha: bool) -> Vec<u8> {
    let rgba = image::RgbaImage::from_fn(w, h, |x, y| {
        image::Rgba([(x * 13) as u8, (y * 7) as u8, (x ^ y) as u8, 200])
    });
    let img = if alpha && format != image::ImageFormat::Jpeg {
        image::DynamicImage::ImageRgba8(rgba)
    } else {
        image::DynamicImage::ImageRgb8(image::DynamicImage::ImageRgba8(rgba).to_rgb8())
    };
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn seeds() -> Vec<Vec<u8>> {
    use image::ImageFormat::{Jpeg, Png, WebP};
    vec![
        encoded(Png, 24, 16, false),
        encoded(Png, 24, 16, true),
        encoded(Jpeg, 24, 16, false),
        encoded(WebP, 24, 16, true),
        encoded(WebP, 24, 16, false),
    ]
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut crc_input = kind.to_vec();
    crc_input.extend_from_slice(data);
    out.extend_from_slice(&crc32(&crc_input).to_be_bytes());
    out
}

/// A well-formed header claiming `w` x `h` (valid checksums), with a tiny or empty body.
fn claiming(format: u8, w: u32, h: u32, depth: u8) -> Vec<u8> {
    match format {
        0 => {
            let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
            let mut ihdr = w.to_be_bytes().to_vec();
            ihdr.extend_from_slice(&h.to_be_bytes());
            // depth 8 or 16, colour type 6 (RGBA): the largest buffers.
            ihdr.extend_from_slice(&[if depth.is_multiple_of(2) { 8 } else { 16 }, 6, 0, 0, 0]);
            out.extend(png_chunk(b"IHDR", &ihdr));
            out.extend(png_chunk(
                b"IDAT",
                &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
            ));
            out.extend(png_chunk(b"IEND", &[]));
            out
        }
        1 => {
            // A baseline greyscale JPEG: SOI, a quantisation table, SOF0 claiming the size,
            // one-code DC and AC Huffman tables, SOS, a few bytes of scan, EOI.
            let (w, h) = (w.min(0xFFFF) as u16, h.min(0xFFFF) as u16);
            let mut out = vec![0xFF, 0xD8, 0xFF, 0xDB, 0x00, 0x43, 0x00];
            out.extend_from_slice(&[1; 64]);
            out.extend_from_slice(&[0xFF, 0xC0, 0x00, 0x0B, 0x08]);
            out.extend_from_slice(&h.to_be_bytes());
            out.extend_from_slice(&w.to_be_bytes());
            out.extend_from_slice(&[1, 1, 0x11, 0]);
            for class in [0x00, 0x10] {
                out.extend_from_slice(&[0xFF, 0xC4, 0x00, 0x14, class, 1]);
                out.extend_from_slice(&[0; 15]);
                out.push(0);
            }
            out.extend_from_slice(&[0xFF, 0xDA, 0x00, 0x08, 1, 1, 0x00, 0, 63, 0]);
            out.extend_from_slice(&[0; 8]);
            out.extend_from_slice(&[0xFF, 0xD9]);
            out
        }
        _ => {
            // WebP VP8X: a canvas of up to 2^24 a side.
            let (w, h) = (w.clamp(1, 1 << 24) - 1, h.clamp(1, 1 << 24) - 1);
            let mut vp8x = vec![0x10, 0, 0, 0];
            vp8x.extend_from_slice(&w.to_le_bytes()[..3]);
            vp8x.extend_from_slice(&h.to_le_bytes()[..3]);
            let mut body = b"WEBPVP8X".to_vec();
            body.extend_from_slice(&(vp8x.len() as u32).to_le_bytes());
            body.extend(vp8x);
            // The image itself: a 1x1 lossless bitstream header.
            body.extend_from_slice(b"VP8L");
            body.extend_from_slice(&6u32.to_le_bytes());
            body.extend_from_slice(&[0x2f, 0, 0, 0, 0, 0]);
            let mut out = b"RIFF".to_vec();
            out.extend_from_slice(&(body.len() as u32).to_le_bytes());
            out.extend(body);
            out
        }
    }
}

fn side() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(1),
        Just(4096),
        Just(4097),
        Just(65535),
        Just(65536),
        Just(1 << 24),
        Just(u32::MAX),
        Just(i32::MAX as u32),
        0u32..10_000,
        any::<u32>(),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
    Truncate(usize),
    /// A big-endian or little-endian u16/u32 (sizes, lengths) set to an edge value.
    Field(usize, u8, bool, u32),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(p, b)| Mutation::Flip(p, b)),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..12))
            .prop_map(|(p, b)| Mutation::Insert(p, b)),
        (any::<usize>(), 1usize..32).prop_map(|(p, n)| Mutation::Remove(p, n)),
        any::<usize>().prop_map(Mutation::Truncate),
        (
            any::<usize>(),
            prop_oneof![Just(2u8), Just(4)],
            any::<bool>(),
            prop_oneof![
                Just(0u32),
                Just(1),
                Just(0xFFFF),
                Just(0x7FFF_FFFF),
                Just(u32::MAX),
                any::<u32>()
            ]
        )
            .prop_map(|(p, w, be, v)| Mutation::Field(p, w, be, v)),
    ]
}

fn mutate(mut b: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        let n = b.len();
        if n == 0 {
            break;
        }
        match m {
            Mutation::Flip(p, x) => b[p % n] ^= x,
            Mutation::Insert(p, bytes) => {
                let at = p % (n + 1);
                b.splice(at..at, bytes.iter().copied());
            }
            Mutation::Remove(p, len) => {
                let at = p % n;
                b.drain(at..(at + len).min(n));
            }
            Mutation::Truncate(p) => b.truncate(p % n),
            Mutation::Field(p, w, be, v) => {
                let w = *w as usize;
                if n >= w {
                    let at = p % (n - w + 1);
                    let bytes = if *be {
                        v.to_be_bytes()
                    } else {
                        v.to_le_bytes()
                    };
                    let field = if *be { &bytes[4 - w..] } else { &bytes[..w] };
                    b[at..at + w].copy_from_slice(field);
                }
            }
        }
    }
    b
}

/// The same bytes as a request field: a 422 naming it, or a request that holds the image.
fn check_as_field(bytes: &[u8]) {
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    let body = json!({"prompt": "a", "init_image": b64}).to_string();
    match crate::validate::parse_generate(body.as_bytes()) {
        Ok(v) => assert!(v.init_image.is_some()),
        Err(e) => {
            assert_eq!(
                e.status_and_code().0,
                StatusCode::UNPROCESSABLE_ENTITY,
                "{e:?}"
            );
            let fields: Vec<&str> = e.fields().iter().map(|f| f.field.as_str()).collect();
            assert_eq!(fields, ["init_image"], "{e:?}");
            assert!(e.fields()[0].rule.len() > 5, "{e:?}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_images_decode_or_fail_cleanly(seed in 0..5usize, muts in prop::collection::vec(mutation(), 1..5)) {
        let bytes = mutate(seeds().swap_remove(seed), &muts);
        let (r, peak) = peak_during(|| decode_bytes(&bytes));
        prop_assert!(peak <= DECODER_LIMIT, "{peak} bytes");
        match r {
            Ok(img) => {
                let i = &img.image;
                prop_assert_eq!(i.pixels.len(), (i.width * i.height * 3) as usize);
                prop_assert!(crate::images::check_dimensions(i.width, i.height).is_ok());
            }
            Err(rule) => prop_assert!(!rule.is_empty()),
        }
        check_as_field(&bytes);
    }

    #[test]
    fn claimed_sizes_cost_nothing_past_the_limits(format in 0..3u8, w in side(), h in side(), depth in any::<u8>()) {
        let bytes = claiming(format, w, h, depth);
        let (r, peak) = peak_during(|| decode_bytes(&bytes));
        let over = crate::images::check_dimensions(w, h).is_err();
        if over {
            prop_assert!(r.is_err(), "{w}x{h} accepted");
            prop_assert!(peak <= header_refusal_bound(bytes.len()), "{w}x{h}: {peak} bytes for a {}-byte file", bytes.len());
        } else {
            prop_assert!(peak <= DECODER_LIMIT, "{w}x{h}: {peak} bytes");
        }
        check_as_field(&bytes);
    }

    #[test]
    fn random_base64_and_data_urls(
        prefix in prop::sample::select(vec!["", "data:image/png;base64,", "data:image/jpeg;base64,", "data:text/plain;base64,", "data:image/png,", "data:", "data:image/png;base64", " "]),
        text in prop_oneof!["[A-Za-z0-9+/=]{0,200}", "[A-Za-z0-9+/=\\s\\-_.,:;]{0,64}", ".{0,64}"],
        seed in prop::option::of(0..5usize),
    ) {
        let text = match seed {
            Some(s) => format!("{prefix}{}{text}", base64::engine::general_purpose::STANDARD.encode(&seeds()[s])),
            None => format!("{prefix}{text}"),
        };
        let (r, peak) = peak_during(|| decode_base64(&text));
        prop_assert!(peak <= DECODER_LIMIT);
        if let Err(rule) = r {
            prop_assert!(!rule.is_empty());
        }
        let body = json!({"prompt": "a", "init_image": text.clone(), "mask_image": text}).to_string();
        if let Err(e) = crate::validate::parse_generate(body.as_bytes()) {
            prop_assert_eq!(e.status_and_code().0, StatusCode::UNPROCESSABLE_ENTITY);
            for f in e.fields() {
                prop_assert!(f.field == "init_image" || f.field == "mask_image", "{:?}", e);
            }
        }
    }
}

/// PNGs with text chunks (tEXt, zTXt, and iTXt inflating to 2 MiB and more), as `png-info`
/// reads them.
fn text_seeds() -> &'static [Vec<u8>] {
    static SEEDS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    SEEDS.get_or_init(|| {
        [100usize, 3 << 20]
            .iter()
            .map(|&n| {
                let mut out = Vec::new();
                let mut enc = png::Encoder::new(&mut out, 2, 2);
                enc.set_color(png::ColorType::Grayscale);
                enc.add_text_chunk("parameters".into(), "a cat\nSteps: 4".into())
                    .unwrap();
                enc.add_ztxt_chunk("z".into(), "z".repeat(n)).unwrap();
                let mut w = enc.write_header().unwrap();
                let mut itxt = png::text_metadata::ITXtChunk::new("i", "i".repeat(n));
                itxt.compressed = true;
                w.write_text_chunk(&itxt).unwrap();
                w.write_image_data(&[0, 1, 2, 3]).unwrap();
                drop(w);
                out
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases() / 2, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn png_text_chunks_are_read_within_the_budget(seed in 0..2usize, muts in prop::collection::vec(mutation(), 0..4)) {
        let bytes = mutate(text_seeds()[seed].clone(), &muts);
        let (chunks, peak) = peak_during(|| crate::png::read_text_chunks(&bytes));
        let text: usize = chunks.values().filter_map(|v| v.as_str()).map(str::len).sum();
        prop_assert!(text <= crate::png::TEXT_BUDGET);
        prop_assert!(peak <= 4 * bytes.len() + 3 * crate::png::TEXT_BUDGET, "{peak} bytes");
    }
}

/// The bound the properties rely on is real: a header claiming 60000 x 60000 RGBA16 (28.8 GB
/// decoded) costs a few KB; the same file claiming 4096 x 4096 (within the limits) is allowed
/// to cost its buffer, and no more than the decoder's limit.
#[test]
fn a_claimed_size_past_the_limit_allocates_nothing_for_it() {
    for format in 0..3 {
        let bytes = claiming(format, 60000, 60000, 1);
        let (r, peak) = peak_during(|| decode_bytes(&bytes));
        let e = r.unwrap_err();
        assert!(e.contains("60000x60000"), "{format}: {e}");
        assert!(
            peak <= header_refusal_bound(bytes.len()),
            "{format}: {peak} bytes"
        );
    }
    let (r, peak) = peak_during(|| decode_bytes(&claiming(0, 4096, 4096, 1)));
    assert!(r.is_err());
    assert!(peak <= DECODER_LIMIT, "{peak}");
    // The counter sees allocations at all.
    let (_, peak) = peak_during(|| vec![1u8; 1 << 20]);
    assert!(peak >= 1 << 20);
}
