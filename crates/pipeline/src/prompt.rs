//! Prompts as AUTOMATIC1111 writes them (A1111's `prompt_parser.py`): emphasis, escapes and `BREAK` parsed into
//! weighted pieces, then tokenized into chunks of 75 tokens wrapped as `BOS + 75 + EOS`.
//!
//! Written from the semantics of A1111's `parse_prompt_attention` and its CLIP chunking (default
//! options: emphasis "Original", comma backtrack 20); the committed reference is
//! `tools/make_prompt_fixtures.py`.

use crate::tokenizer::ClipTokenizer;
use crate::Result;

/// `)` multiplies its group by this; `]` divides by it.
const ROUND_MULTIPLIER: f64 = 1.1;
/// A full chunk whose last comma is at most this many tokens back moves what follows the comma
/// to the next chunk (A1111's `comma_padding_backtrack`).
const COMMA_BACKTRACK: usize = 20;

/// A run of prompt text with its emphasis. `BREAK` outside any group is the piece `("BREAK", -1)`,
/// as in A1111 (inside a group its weight is multiplied and it becomes text).
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedText {
    pub text: String,
    pub weight: f64,
}

impl WeightedText {
    fn new(text: impl Into<String>, weight: f64) -> Self {
        Self {
            text: text.into(),
            weight,
        }
    }

    fn is_break(&self) -> bool {
        self.text == "BREAK" && self.weight == -1.0
    }
}

/// Splits `text` into weighted pieces, left to right: `\(`, `\)`, `\[`, `\]`, `\\` are literal
/// characters (a lone `\` is dropped); `(` and `[` open groups; `:N)` closes a `(` group with
/// weight N; `)` multiplies by 1.1 and `]` by 1/1.1; closers without an opener are text; groups
/// left open apply their default at the end. Neighbouring pieces of equal weight merge; an empty
/// prompt is `("", 1.0)`.
pub fn parse_attention(text: &str) -> Vec<WeightedText> {
    let mut res: Vec<WeightedText> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<WeightedText>, from: usize, m: f64| {
        for piece in &mut res[from..] {
            piece.weight *= m;
        }
    };
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\\' => {
                // `\(` `\)` `\[` `\]` `\\` keep the character; a lone backslash is dropped.
                match chars.get(i + 1) {
                    Some(&n @ ('(' | ')' | '[' | ']' | '\\')) => {
                        res.push(WeightedText::new(n.to_string(), 1.0));
                        i += 2;
                    }
                    _ => {
                        res.push(WeightedText::new("", 1.0));
                        i += 1;
                    }
                }
            }
            '(' => {
                round.push(res.len());
                i += 1;
            }
            '[' => {
                square.push(res.len());
                i += 1;
            }
            ':' => match weight_closer(&chars[i..]) {
                Some((len, weight)) => {
                    match (weight, round.pop()) {
                        (Some(w), Some(start)) => multiply(&mut res, start, w),
                        (_, popped) => {
                            // No open group (or an unreadable number): the text as it stands.
                            if let Some(p) = popped {
                                round.push(p);
                            }
                            push_text(&mut res, &chars[i..i + len].iter().collect::<String>());
                        }
                    }
                    i += len;
                }
                None => {
                    push_text(&mut res, ":");
                    i += 1;
                }
            },
            ')' => {
                match round.pop() {
                    Some(start) => multiply(&mut res, start, ROUND_MULTIPLIER),
                    None => push_text(&mut res, ")"),
                }
                i += 1;
            }
            ']' => {
                match square.pop() {
                    Some(start) => multiply(&mut res, start, 1.0 / ROUND_MULTIPLIER),
                    None => push_text(&mut res, "]"),
                }
                i += 1;
            }
            _ => {
                let start = i;
                while i < chars.len() && !matches!(chars[i], '\\' | '(' | ')' | '[' | ']' | ':') {
                    i += 1;
                }
                push_text(&mut res, &chars[start..i].iter().collect::<String>());
            }
        }
    }
    for start in round {
        multiply(&mut res, start, ROUND_MULTIPLIER);
    }
    for start in square {
        multiply(&mut res, start, 1.0 / ROUND_MULTIPLIER);
    }
    if res.is_empty() {
        res.push(WeightedText::new("", 1.0));
    }
    let mut merged: Vec<WeightedText> = Vec::with_capacity(res.len());
    for piece in res {
        match merged.last_mut() {
            Some(last) if last.weight == piece.weight => last.text.push_str(&piece.text),
            _ => merged.push(piece),
        }
    }
    merged
}

/// At a `:`, the closer `:\s*([+-]?[.\d]+)\s*\)`: its length in chars and the number (`None`
/// when the digits and dots do not make a number).
fn weight_closer(chars: &[char]) -> Option<(usize, Option<f64>)> {
    let mut i = 1;
    while i < chars.len() && chars[i].is_whitespace() {
        i += 1;
    }
    let num_start = i;
    if i < chars.len() && matches!(chars[i], '+' | '-') {
        i += 1;
    }
    let digits_start = i;
    while i < chars.len() && (chars[i] == '.' || chars[i].is_ascii_digit()) {
        i += 1;
    }
    if i == digits_start {
        return None;
    }
    let number: String = chars[num_start..i].iter().collect();
    while i < chars.len() && chars[i].is_whitespace() {
        i += 1;
    }
    if chars.get(i) != Some(&')') {
        return None;
    }
    Some((i + 1, number.parse::<f64>().ok()))
}

/// Appends plain text, split on the word `BREAK` (`\s*\bBREAK\b\s*`) into `BREAK` markers.
fn push_text(res: &mut Vec<WeightedText>, text: &str) {
    for (i, part) in split_break(text).into_iter().enumerate() {
        if i > 0 {
            res.push(WeightedText::new("BREAK", -1.0));
        }
        res.push(WeightedText::new(part, 1.0));
    }
}

pub(crate) fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// `re.split(r"\bWORD\b", text)`; with `spaces`, `re.split(r"\s*\bWORD\b\s*", text)` (the
/// whitespace around each match goes with it).
pub(crate) fn split_word(text: &str, word: &str, spaces: bool) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let target: Vec<char> = word.chars().collect();
    let mut parts = Vec::new();
    let mut part_start = 0;
    let mut i = 0;
    while i + target.len() <= chars.len() {
        let bounded = chars[i..i + target.len()] == target[..]
            && (i == 0 || !is_word(chars[i - 1]))
            && chars.get(i + target.len()).is_none_or(|&c| !is_word(c));
        if !bounded {
            i += 1;
            continue;
        }
        let (mut left, mut right) = (i, i + target.len());
        while spaces && left > part_start && chars[left - 1].is_whitespace() {
            left -= 1;
        }
        while spaces && right < chars.len() && chars[right].is_whitespace() {
            right += 1;
        }
        parts.push(chars[part_start..left].iter().collect());
        part_start = right;
        i = right;
    }
    parts.push(chars[part_start..].iter().collect());
    parts
}

/// `re.split(r"\s*\bBREAK\b\s*", text)`.
fn split_break(text: &str) -> Vec<String> {
    split_word(text, "BREAK", true)
}

/// One chunk of conditioning: `BOS + 75 tokens + EOS` with a weight per token.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Chunk {
    /// True when every weight is 1 (emphasis leaves the chunk as encoded).
    pub fn unweighted(&self) -> bool {
        self.weights.iter().all(|&w| w == 1.0)
    }
}

/// Tokenizes the pieces of an A1111 prompt into chunks of `max_length - 2` tokens (75 for CLIP),
/// with the comma backtrack and `BREAK`. Chunks are padded with EOS and wrapped in BOS/EOS; a
/// tokenizer whose pad token is not EOS gets its pad token after the first EOS, as diffusers pads.
pub fn chunks(tokenizer: &ClipTokenizer, pieces: &[WeightedText]) -> Result<Vec<Chunk>> {
    let chunk_len = tokenizer.max_length() - 2;
    let comma = tokenizer.token_id(",</w>");
    let mut builder = ChunkBuilder {
        chunk_len,
        bos: tokenizer.bos_id(),
        eos: tokenizer.eos_id(),
        pad: tokenizer.pad_id(),
        done: Vec::new(),
        ids: Vec::new(),
        weights: Vec::new(),
        last_comma: None,
    };
    for piece in pieces {
        if piece.is_break() {
            builder.close();
            continue;
        }
        let weight = piece.weight as f32;
        for id in tokenizer.tokenize(&piece.text)? {
            if Some(id) == comma {
                builder.last_comma = Some(builder.ids.len());
            } else if builder.ids.len() == chunk_len {
                if let Some(at) = builder.last_comma {
                    if chunk_len - at <= COMMA_BACKTRACK {
                        // Move the words after the comma to the next chunk.
                        let moved_ids = builder.ids.split_off(at + 1);
                        let moved_weights = builder.weights.split_off(at + 1);
                        builder.close();
                        builder.ids = moved_ids;
                        builder.weights = moved_weights;
                    }
                }
            }
            if builder.ids.len() == chunk_len {
                builder.close();
            }
            builder.ids.push(id);
            builder.weights.push(weight);
        }
    }
    if !builder.ids.is_empty() || builder.done.is_empty() {
        builder.close();
    }
    Ok(builder.done)
}

struct ChunkBuilder {
    chunk_len: usize,
    bos: u32,
    eos: u32,
    pad: u32,
    done: Vec<Chunk>,
    ids: Vec<u32>,
    weights: Vec<f32>,
    last_comma: Option<usize>,
}

impl ChunkBuilder {
    fn close(&mut self) {
        let mut ids = Vec::with_capacity(self.chunk_len + 2);
        ids.push(self.bos);
        ids.append(&mut self.ids);
        let mut weights = vec![1.0f32];
        weights.append(&mut self.weights);
        // EOS right after the text, then padding (EOS for CLIP, whose pad token is EOS).
        ids.push(self.eos);
        weights.push(1.0);
        ids.resize(self.chunk_len + 2, self.pad);
        weights.resize(self.chunk_len + 2, 1.0);
        self.done.push(Chunk { ids, weights });
        self.last_comma = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Vec<(String, f64)> {
        parse_attention(text)
            .into_iter()
            .map(|p| (p.text, p.weight))
            .collect()
    }

    fn close(a: &[(String, f64)], b: &[(&str, f64)]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|((t, w), (t2, w2))| t == t2 && (w - w2).abs() < 1e-12)
    }

    #[test]
    fn emphasis_forms() {
        let cases: Vec<(&str, Vec<(&str, f64)>)> = vec![
            ("normal text", vec![("normal text", 1.0)]),
            (
                "an (important) word",
                vec![("an ", 1.0), ("important", 1.1), (" word", 1.0)],
            ),
            ("(unbalanced", vec![("unbalanced", 1.1)]),
            ("\\(literal\\]", vec![("(literal]", 1.0)]),
            ("(unnecessary)(parens)", vec![("unnecessaryparens", 1.1)]),
            ("((a))", vec![("a", 1.1 * 1.1)]),
            ("[a]", vec![("a", 1.0 / 1.1)]),
            ("(a:1.5) b", vec![("a", 1.5), (" b", 1.0)]),
            ("(a: 1.5 ) b", vec![("a", 1.5), (" b", 1.0)]),
            ("a:1.5) b", vec![("a:1.5) b", 1.0)]),
            ("a) b]", vec![("a) b]", 1.0)]),
            ("", vec![("", 1.0)]),
            (
                "a (house:1.3) ( [on] a (hill:0.5)), sun, (((sky))).",
                vec![
                    ("a ", 1.0),
                    ("house", 1.3),
                    (" ", 1.0),
                    (" ", 1.1),
                    ("on", 1.0),
                    (" a ", 1.1),
                    ("hill", 0.55),
                    (", sun, ", 1.0),
                    ("sky", 1.331),
                    (".", 1.0),
                ],
            ),
            ("a BREAK b", vec![("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
            ("aBREAK b", vec![("aBREAK b", 1.0)]),
            ("(a BREAK b)", vec![("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
        ];
        for (text, want) in cases {
            let got = parsed(text);
            assert!(close(&got, &want), "{text:?}: {got:?} != {want:?}");
        }
    }

    #[test]
    fn break_split_follows_word_boundaries() {
        assert_eq!(split_break("x BREAK\ny"), vec!["x", "y"]);
        assert_eq!(split_break("BREAK BREAK"), vec!["", "", ""]);
        assert_eq!(split_break("BREAKS"), vec!["BREAKS"]);
        assert_eq!(split_break("_BREAK"), vec!["_BREAK"]);
        assert_eq!(split_break("a,BREAK,b"), vec!["a,", ",b"]);
    }
}
