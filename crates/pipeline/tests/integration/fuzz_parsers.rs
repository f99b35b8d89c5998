//! Property-based fuzzing of the readers of model files, which may come from strangers (a
//! downloaded checkpoint, a LoRA): the `.ckpt` reader (zip and legacy pickles), the safetensors
//! header and validation, and single-file detection. Inputs are the committed fixtures mutated
//! (bytes flipped, inserted, removed, truncated, little-endian fields set to edge values) and
//! pickles assembled from random opcodes; and prompt text through the A1111 emphasis parser and
//! CLIP chunking. The property: no panic, no hang, an `Err` or a value.
//!
//! `PROPTEST_CASES` sets the cases per property (CI: the default below; a long run: 100000).

use crate::common;

use std::path::Path;

use common::fuzz::{apply, mutation, Scratch};

use proptest::prelude::*;
use sdserve_pipeline::ckpt::Checkpoint;
use sdserve_pipeline::single_file::{is_single_file, validate_safetensors};

fn fixture(name: &str) -> Vec<u8> {
    let p = common::fixture_path("single-file").join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn cases() -> u32 {
    common::fuzz::cases(5000)
}

/// Everything a loader does with a checkpoint: parse, list the weights, read each tensor.
fn exercise_ckpt(path: &Path) {
    let Ok(ck) = Checkpoint::open(path) else {
        return;
    };
    let _ = ck.root().to_json();
    if let Ok(sd) = ck.state_dict() {
        for (_, t) in sd.iter().take(64) {
            let _ = ck.read_tensor(t);
        }
    }
}

const CKPT_SEEDS: &[&str] = &[
    "features.ckpt",
    "features-legacy.ckpt",
    "malicious-eval.ckpt",
    "malicious-exec.ckpt",
    "malicious-os-system.ckpt",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_checkpoints_never_panic(
        seed in 0..CKPT_SEEDS.len(),
        muts in prop::collection::vec(mutation(), 1..6),
    ) {
        let bytes = apply(fixture(CKPT_SEEDS[seed]), &muts);
        let s = Scratch::new(&format!("ckpt-{:?}", std::thread::current().id()), "ckpt");
        exercise_ckpt(s.write(&bytes));
    }

    #[test]
    fn mutated_safetensors_never_panic(muts in prop::collection::vec(mutation(), 1..6)) {
        let bytes = apply(fixture("features.safetensors"), &muts);
        let s = Scratch::new(&format!("st-{:?}", std::thread::current().id()), "safetensors");
        let p = s.write(&bytes);
        let _ = is_single_file(p);
        let _ = validate_safetensors(p);
    }

    #[test]
    fn random_bytes_as_any_model_file(bytes in prop::collection::vec(any::<u8>(), 0..512), ext in 0..2usize) {
        let s = Scratch::new(&format!("raw-{:?}", std::thread::current().id()), ["ckpt", "safetensors"][ext]);
        let p = s.write(&bytes);
        let _ = is_single_file(p);
        exercise_ckpt(p);
        let _ = validate_safetensors(p);
    }

    #[test]
    fn random_pickles_never_panic(ops in prop::collection::vec(pickle_op(), 0..40)) {
        // A legacy checkpoint is a bare pickle stream (magic number first); random opcodes with
        // plausible arguments reach far deeper into the interpreter than random bytes.
        let mut bytes = vec![0x80, 0x02];
        for op in &ops {
            bytes.extend_from_slice(op);
        }
        bytes.push(b'.');
        let s = Scratch::new(&format!("pkl-{:?}", std::thread::current().id()), "ckpt");
        exercise_ckpt(s.write(&bytes));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases() / 5, failure_persistence: None, ..ProptestConfig::default() })]

    /// Prompt text is outside input too: A1111 emphasis syntax (groups, weights, escapes,
    /// `BREAK`) and CLIP chunking of up to 500 characters of anything.
    #[test]
    fn prompts_parse_and_chunk(text in "([()\\[\\]:\\\\.,0-9 a-zé]|BREAK|:1.5\\)|\\\\\\(|<lora:x:1>){0,120}|.{0,500}") {
        let pieces = sdserve_pipeline::prompt::parse_attention(&text);
        prop_assert!(!pieces.is_empty());
        let tokenizer = tokenizer();
        let chunks = sdserve_pipeline::prompt::chunks(tokenizer, &pieces).unwrap();
        for c in &chunks {
            prop_assert_eq!(c.ids.len(), tokenizer.max_length());
            prop_assert_eq!(c.weights.len(), c.ids.len());
        }
    }

    /// A1111's prompt scheduling and AND on the same text: every plan has a text for every
    /// evaluation, a schedule's ends ascend and stop at the pass's steps, and deep nesting
    /// neither overflows the stack nor takes long.
    #[test]
    fn prompts_schedule(text in "([\\[\\]():|\\\\ ab1.5]|AND|:0.5\\]|\\[a:|\\[b\\|){0,160}|.{0,500}", steps in 1usize..100, hires in 0usize..60) {
        let hires = (hires > 0).then_some(hires);
        let plan = sdserve_pipeline::prompt_schedule::PromptPlan::new(&text, Some(&text), steps, hires);
        let pass = hires.unwrap_or(steps);
        for schedule in plan.parts.iter().map(|(_, s)| s).chain(plan.negative.iter()) {
            prop_assert!(schedule.windows(2).all(|w| w[0].0 < w[1].0));
            prop_assert_eq!(schedule.last().unwrap().0, pass);
        }
        for step in 0..=pass + 1 {
            let (parts, negative) = plan.at(step);
            prop_assert!(parts.iter().all(|(i, _)| *i < plan.texts.len()));
            prop_assert!(negative.is_some_and(|i| i < plan.texts.len()));
        }
        let nested = format!("{}x{}", "[".repeat(500), "]".repeat(500));
        prop_assert_eq!(sdserve_pipeline::prompt_schedule::schedule(&nested, steps, None).len(), 1);
    }
}

fn tokenizer() -> &'static sdserve_pipeline::tokenizer::ClipTokenizer {
    static T: std::sync::OnceLock<sdserve_pipeline::tokenizer::ClipTokenizer> =
        std::sync::OnceLock::new();
    T.get_or_init(|| {
        sdserve_pipeline::tokenizer::ClipTokenizer::from_dir(&common::fixture_path(
            "clip-tokenizer",
        ))
        .unwrap()
    })
}

/// One pickle opcode with arguments: containers, memo, strings with edge lengths, ints,
/// globals (allowed and refused), persistent ids and REDUCE/BUILD, the opcodes the reader knows.
fn pickle_op() -> impl Strategy<Value = Vec<u8>> {
    let len = prop_oneof![
        Just(0u64),
        Just(1),
        Just(3),
        Just(0xFF),
        Just(0xFFFF_FFFF),
        Just(u64::MAX),
        Just(u64::MAX - 2)
    ];
    let simple = prop::sample::select(vec![
        b"(".to_vec(),
        b"}".to_vec(),
        b"]".to_vec(),
        b")".to_vec(),
        b"N".to_vec(),
        vec![0x88],
        vec![0x89],
        b"t".to_vec(),
        b"l".to_vec(),
        b"d".to_vec(),
        b"s".to_vec(),
        b"u".to_vec(),
        b"a".to_vec(),
        b"e".to_vec(),
        b"R".to_vec(),
        b"b".to_vec(),
        b"Q".to_vec(),
        b"0".to_vec(),
        b"2".to_vec(),
        vec![0x85],
        vec![0x86],
        vec![0x87],
        vec![0x94],
        vec![0x81],
        b"c".to_vec(),
        b"ctorch._utils\n_rebuild_tensor_v2\n".to_vec(),
        b"ctorch._utils\n_rebuild_parameter\n".to_vec(),
        b"ctorch\nFloatStorage\n".to_vec(),
        b"ctorch\nHalfStorage\n".to_vec(),
        b"ccollections\nOrderedDict\n".to_vec(),
        b"cos\nsystem\n".to_vec(),
        b"cbuiltins\neval\n".to_vec(),
        b"\x8c\x07storage".to_vec(),
        b"\x8c\x03cpu".to_vec(),
        b"X\x01\x00\x00\x000".to_vec(),
        b"I01\n".to_vec(),
        b"I-5\n".to_vec(),
        b"Ixyz\n".to_vec(),
        b"V\n".to_vec(),
        b"S'a'\n".to_vec(),
        b"F1.5\n".to_vec(),
        b"L5L\n".to_vec(),
    ]);
    prop_oneof![
        4 => simple,
        1 => any::<u8>().prop_map(|v| vec![b'K', v]),
        1 => any::<u16>().prop_map(|v| { let mut o = vec![b'M']; o.extend(v.to_le_bytes()); o }),
        1 => any::<i32>().prop_map(|v| { let mut o = vec![b'J']; o.extend(v.to_le_bytes()); o }),
        1 => (0u8..20, prop::collection::vec(any::<u8>(), 0..20)).prop_map(|(n, b)| { let mut o = vec![0x8a, n]; o.extend(b); o }),
        1 => any::<u8>().prop_map(|v| vec![b'q', v]),
        1 => any::<u8>().prop_map(|v| vec![b'h', v]),
        1 => any::<u32>().prop_map(|v| { let mut o = vec![b'r']; o.extend(v.to_le_bytes()); o }),
        1 => any::<u32>().prop_map(|v| { let mut o = vec![b'j']; o.extend(v.to_le_bytes()); o }),
        1 => (prop::sample::select(vec![b'X', b'T', b'B']), len.clone()).prop_map(|(op, n)| { let mut o = vec![op]; o.extend((n as u32).to_le_bytes()); o.extend(b"abc"); o }),
        1 => (prop::sample::select(vec![0x8d, 0x8e, 0x95]), len.clone()).prop_map(|(op, n)| { let mut o = vec![op]; o.extend(n.to_le_bytes()); o.extend(b"abc"); o }),
        1 => (prop::sample::select(vec![0x8c, b'U', b'C']), any::<u8>()).prop_map(|(op, n)| { let mut o = vec![op, n]; o.extend(b"abc"); o }),
        1 => any::<[u8; 8]>().prop_map(|b| { let mut o = vec![b'G']; o.extend(b); o }),
    ]
}
