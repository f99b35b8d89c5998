//! A1111's prompt scheduling (`modules/prompt_parser.py`): prompt editing `[from:to:when]`,
//! `[to:when]`, `[from::when]`, alternation `[a|b|c]`, and composable diffusion's `AND` with
//! weights (`a cat :1.2 AND a dog`).
//!
//! Written from the semantics of A1111's lark grammar `schedule_parser`,
//! `get_learned_conditioning_prompt_schedules` (default options: `use_old_scheduling` off) and
//! `get_multicond_prompt_list`; the committed reference is
//! `tools/make_prompt_schedule_fixtures.py`, which runs A1111's own code. A prompt the grammar
//! refuses (a `|` outside brackets, a trailing backslash) is scheduled as written, as A1111
//! falls back when lark fails. Emphasis, `BREAK` and escapes stay in the scheduled texts for
//! [`crate::prompt::parse_attention`].

use crate::prompt::split_word;

/// One AND part of a prompt: its text (scheduled later) and its weight.
#[derive(Debug, Clone, PartialEq)]
pub struct AndPart {
    pub text: String,
    pub weight: f64,
}

/// `get_multicond_prompt_list` for one prompt: split on the word `AND` (`\bAND\b`), then each
/// part's trailing `:weight` (`\s*:\s*[-+]?(\d+\.?|\d*\.\d+)`) and trailing whitespace are
/// taken off (`re_weight`); a part without one weighs 1.
pub fn and_parts(prompt: &str) -> Vec<AndPart> {
    split_word(prompt, "AND", false)
        .into_iter()
        .map(|part| {
            let (text, weight) = part_weight(&part);
            AndPart { text, weight }
        })
        .collect()
}

/// `re_weight`: `^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$`. The text is the
/// shortest prefix after which the rest is an optional weight and whitespace.
fn part_weight(part: &str) -> (String, f64) {
    let chars: Vec<char> = part.chars().collect();
    for split in 0..=chars.len() {
        let rest = &chars[split..];
        let text = || chars[..split].iter().collect::<String>();
        if let Some(w) = weight_tail(rest) {
            return (text(), w);
        }
        if rest.iter().all(|c| c.is_whitespace()) {
            return (text(), 1.0);
        }
    }
    (part.to_string(), 1.0)
}

/// `\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+))\s*$` over all of `rest`: the weight.
fn weight_tail(rest: &[char]) -> Option<f64> {
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < rest.len() && rest[*i].is_whitespace() {
            *i += 1;
        }
    };
    skip_ws(&mut i);
    if rest.get(i) != Some(&':') {
        return None;
    }
    i += 1;
    skip_ws(&mut i);
    let start = i;
    if matches!(rest.get(i), Some('+' | '-')) {
        i += 1;
    }
    let int_start = i;
    while i < rest.len() && rest[i].is_ascii_digit() {
        i += 1;
    }
    let int_digits = i - int_start;
    let mut frac_digits = 0;
    if rest.get(i) == Some(&'.') {
        i += 1;
        while i < rest.len() && rest[i].is_ascii_digit() {
            i += 1;
            frac_digits += 1;
        }
    }
    // `\d+\.?` or `\d*\.\d+`.
    if int_digits == 0 && frac_digits == 0 {
        return None;
    }
    let number: String = rest[start..i].iter().collect();
    skip_ws(&mut i);
    if i != rest.len() {
        return None;
    }
    number.parse().ok()
}

/// A1111's prompt schedule of one prompt (one AND part): `(end_at_step, text)` pairs, the
/// steps ascending; the text at step `k` is the first whose `end_at_step >= k`
/// ([`entry_at`]).
///
/// `steps` is the pass's step count as A1111 counts it (doubled for second-order samplers);
/// `hires_steps`: this is a hires pass of that many steps following a first pass of `steps`
/// (A1111 1.6's timeline: a `when` with a `.` is a fraction of both passes, `1.5` halfway
/// through the hires pass; one without is a step number counted from the first pass's start).
pub fn schedule(prompt: &str, steps: usize, hires_steps: Option<usize>) -> Vec<(usize, String)> {
    let (pass_steps, int_offset, frac_offset) = match hires_steps {
        None => (steps, 0.0, 0.0),
        Some(h) => (h, steps as f64, 1.0),
    };
    let chars: Vec<char> = prompt.chars().collect();
    let Some(nodes) = parse_top(&chars) else {
        return vec![(pass_steps, prompt.to_string())];
    };
    let when = |number: &str| -> i64 {
        let v: f64 = number.parse().unwrap_or(0.0);
        let v = if number.contains('.') {
            (v - frac_offset) * pass_steps as f64
        } else {
            v - int_offset
        };
        // `min(steps, int(v))`; Python's int() truncates (and fails on an infinite float,
        // which `1e999` makes: taken as past the end here).
        if v.is_finite() {
            (v.trunc() as i64).min(pass_steps as i64)
        } else if v > 0.0 {
            pass_steps as i64
        } else {
            i64::MIN
        }
    };
    let mut ends = vec![pass_steps as i64];
    let mut alternates = false;
    visit(&nodes, &mut |node| match node {
        Node::Scheduled { when: number, .. } => {
            let w = when(number);
            if w >= 1 {
                ends.push(w);
            }
        }
        Node::Alternate(_) => alternates = true,
        Node::Text(_) => {}
    });
    if alternates {
        ends.extend(1..=pass_steps as i64);
    }
    ends.sort_unstable();
    ends.dedup();
    ends.into_iter()
        .map(|step| {
            let mut text = String::new();
            render(&nodes, step, &when, &mut text);
            (step as usize, text)
        })
        .collect()
}

/// `reconstruct_cond_batch`'s choice at `step` (0-based UNet evaluations): the first entry
/// whose end is at or past the step, else the first entry.
pub fn entry_at<T>(entries: &[(usize, T)], step: usize) -> usize {
    entries
        .iter()
        .position(|(end, _)| step <= *end)
        .unwrap_or(0)
}

/// What a request's prompts ask of each UNet evaluation, as A1111's
/// `get_multicond_learned_conditioning` (prompt) and `get_learned_conditioning` (negative
/// prompt, never split on AND) lay it out: the distinct texts to encode once each, and for
/// every AND part and the negative prompt a schedule of `(end_at_step, text index)`.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptPlan {
    /// Distinct texts, negative prompt's first, in order of first use.
    pub texts: Vec<String>,
    /// The prompt's AND parts: weight and schedule.
    pub parts: Vec<(f64, Vec<(usize, usize)>)>,
    /// The negative prompt's schedule; `None` when it is not asked for.
    pub negative: Option<Vec<(usize, usize)>>,
}

impl PromptPlan {
    /// `steps`/`hires_steps` as [`schedule`] takes them.
    pub fn new(
        prompt: &str,
        negative_prompt: Option<&str>,
        steps: usize,
        hires_steps: Option<usize>,
    ) -> Self {
        let mut texts: Vec<String> = Vec::new();
        let mut index_of = |text: String| match texts.iter().position(|t| *t == text) {
            Some(i) => i,
            None => {
                texts.push(text);
                texts.len() - 1
            }
        };
        let mut scheduled = |text: &str| -> Vec<(usize, usize)> {
            schedule(text, steps, hires_steps)
                .into_iter()
                .map(|(end, text)| (end, index_of(text)))
                .collect()
        };
        let negative = negative_prompt.map(&mut scheduled);
        let parts = and_parts(prompt)
            .into_iter()
            .map(|part| (part.weight, scheduled(&part.text)))
            .collect();
        Self {
            texts,
            parts,
            negative,
        }
    }

    /// More than one AND part, or one with a weight other than 1: the guidance sums the
    /// parts (`uncond + sum_i w_i * g * (cond_i - uncond)`), so it needs the negative prompt's
    /// prediction even where classifier-free guidance would be off.
    pub fn composed(&self) -> bool {
        self.parts.len() != 1 || self.parts[0].0 != 1.0
    }

    /// The texts (indices into `texts`) each AND part and the negative prompt use at UNet
    /// evaluation `step` (0-based).
    pub fn at(&self, step: usize) -> (Vec<(usize, f64)>, Option<usize>) {
        let pick = |s: &[(usize, usize)]| s[entry_at(s, step)].1;
        let parts = self.parts.iter().map(|(w, s)| (pick(s), *w)).collect();
        (parts, self.negative.as_deref().map(pick))
    }
}

#[derive(Debug, Clone)]
enum Node {
    /// Text as written (plain text, escapes kept, emphasis brackets, stray brackets).
    Text(String),
    /// `[before:after:when]`; `before` is empty for `[after:when]`.
    Scheduled {
        before: Vec<Node>,
        after: Vec<Node>,
        when: String,
    },
    /// `[a|b|c]`: option `(step - 1) % n` at a step.
    Alternate(Vec<Vec<Node>>),
}

fn visit(nodes: &[Node], f: &mut dyn FnMut(&Node)) {
    for node in nodes {
        f(node);
        match node {
            Node::Text(_) => {}
            Node::Scheduled { before, after, .. } => {
                visit(before, f);
                visit(after, f);
            }
            Node::Alternate(options) => options.iter().for_each(|o| visit(o, f)),
        }
    }
}

fn render(nodes: &[Node], step: i64, when: &dyn Fn(&str) -> i64, out: &mut String) {
    for node in nodes {
        match node {
            Node::Text(t) => out.push_str(t),
            Node::Scheduled {
                before,
                after,
                when: number,
            } => {
                let side = if step <= when(number) { before } else { after };
                render(side, step, when, out);
            }
            Node::Alternate(options) => {
                let i = (step - 1).rem_euclid(options.len() as i64) as usize;
                render(&options[i], step, when, out);
            }
        }
    }
}

/// `start: (prompt | /[][():]/+)*`: brackets and colons that close nothing are text here; a
/// bracket that opens a well-formed group is that group (as lark resolves the ambiguity). `None`
/// where the grammar fails: a `|` outside brackets, a backslash escaping nothing or a newline.
fn parse_top(chars: &[char]) -> Option<Vec<Node>> {
    let mut nodes = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '[' | '(' => match group(chars, i) {
                Some((mut group, next)) => {
                    nodes.append(&mut group);
                    i = next;
                }
                None => {
                    nodes.push(Node::Text(chars[i].to_string()));
                    i += 1;
                }
            },
            ']' | ')' | ':' => {
                nodes.push(Node::Text(chars[i].to_string()));
                i += 1;
            }
            // No rule takes `|` outside brackets.
            '|' => return None,
            '\\' => {
                // `\\.`: any character but a newline.
                let next = *chars.get(i + 1).filter(|&&c| c != '\n')?;
                nodes.push(Node::Text(['\\', next].iter().collect()));
                i += 2;
            }
            c => {
                nodes.push(Node::Text(c.to_string()));
                i += 1;
            }
        }
    }
    Some(nodes)
}

/// `prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*` from `i`: the nodes and
/// where it stopped (at `]`, `)`, `:`, `|` or the end). `None` where a group inside fails.
fn prompt_items(chars: &[char], mut i: usize) -> Option<(Vec<Node>, usize)> {
    let mut nodes = Vec::new();
    let mut text = String::new();
    while i < chars.len() {
        match chars[i] {
            ']' | ')' | ':' | '|' => break,
            '[' | '(' => {
                if !text.is_empty() {
                    nodes.push(Node::Text(std::mem::take(&mut text)));
                }
                let (mut group, next) = group(chars, i)?;
                nodes.append(&mut group);
                i = next;
            }
            '\\' => {
                // `\\.`: any character but a newline.
                let next = *chars.get(i + 1).filter(|&&c| c != '\n')?;
                text.push('\\');
                text.push(next);
                i += 2;
            }
            c => {
                text.push(c);
                i += 1;
            }
        }
    }
    if !text.is_empty() {
        nodes.push(Node::Text(text));
    }
    Some((nodes, i))
}

/// A group opening at `i` (`(` or `[`) and where it ends, or `None` if none is well formed.
fn group(chars: &[char], i: usize) -> Option<(Vec<Node>, usize)> {
    let (first, mut at) = prompt_items(chars, i + 1)?;
    if chars[i] == '(' {
        // `"(" prompt ")"` or `"(" prompt ":" prompt ")"`: kept as text with its brackets.
        let mut nodes = vec![Node::Text("(".into())];
        nodes.extend(first);
        if chars.get(at) == Some(&':') {
            let (second, next) = prompt_items(chars, at + 1)?;
            nodes.push(Node::Text(":".into()));
            nodes.extend(second);
            at = next;
        }
        if chars.get(at) != Some(&')') {
            return None;
        }
        nodes.push(Node::Text(")".into()));
        return Some((nodes, at + 1));
    }
    match chars.get(at)? {
        ']' => {
            let mut nodes = vec![Node::Text("[".into())];
            nodes.extend(first);
            nodes.push(Node::Text("]".into()));
            Some((nodes, at + 1))
        }
        '|' => {
            let mut options = vec![first];
            while chars.get(at) == Some(&'|') {
                let (option, next) = prompt_items(chars, at + 1)?;
                options.push(option);
                at = next;
            }
            (chars.get(at) == Some(&']')).then(|| (vec![Node::Alternate(options)], at + 1))
        }
        ':' => {
            // `[after:when]`, else `[before:after:when]`.
            if let Some((when, next)) = when_closer(chars, at + 1) {
                let node = Node::Scheduled {
                    before: Vec::new(),
                    after: first,
                    when,
                };
                return Some((vec![node], next));
            }
            let (second, next) = prompt_items(chars, at + 1)?;
            if chars.get(next) != Some(&':') {
                return None;
            }
            let (when, end) = when_closer(chars, next + 1)?;
            let node = Node::Scheduled {
                before: first,
                after: second,
                when,
            };
            Some((vec![node], end))
        }
        _ => None,
    }
}

/// `[WHITESPACE] NUMBER [WHITESPACE] "]"` from `i`: the number's text and the index past `]`.
fn when_closer(chars: &[char], mut i: usize) -> Option<(String, usize)> {
    while i < chars.len() && chars[i].is_whitespace() {
        i += 1;
    }
    let start = i;
    while i < chars.len() && !chars[i].is_whitespace() && chars[i] != ']' {
        i += 1;
    }
    let number: String = chars[start..i].iter().collect();
    while i < chars.len() && chars[i].is_whitespace() {
        i += 1;
    }
    (chars.get(i) == Some(&']') && is_signed_number(&number)).then_some((number, i + 1))
}

/// lark's `SIGNED_NUMBER`: `[+-]? (INT | INT "." INT? | "." INT) ([eE] [+-]? INT)?`, where an
/// exponent needs a mantissa other than a bare `INT` only when written; `1e3` is a FLOAT too.
fn is_signed_number(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(at) => (&s[..at], Some(&s[at + 1..])),
        None => (s, None),
    };
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = match mantissa.split_once('.') {
        None => digits(mantissa),
        Some((int, frac)) => {
            (digits(int) && (frac.is_empty() || digits(frac))) || (int.is_empty() && digits(frac))
        }
    };
    let exponent_ok = exponent.is_none_or(|e| digits(e.strip_prefix(['+', '-']).unwrap_or(e)));
    mantissa_ok && exponent_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(prompt: &str) -> Vec<(usize, String)> {
        schedule(prompt, 10, None)
    }

    fn owned(v: &[(usize, &str)]) -> Vec<(usize, String)> {
        v.iter().map(|(s, t)| (*s, t.to_string())).collect()
    }

    #[test]
    fn a1111_doctests() {
        assert_eq!(g("test"), owned(&[(10, "test")]));
        assert_eq!(g("a [b:3]"), owned(&[(3, "a "), (10, "a b")]));
        assert_eq!(g("[(a:2):3]"), owned(&[(3, ""), (10, "(a:2)")]));
        assert_eq!(
            g("a[b:[c:d:2]:1]e"),
            owned(&[(1, "abe"), (2, "ace"), (10, "ade")])
        );
        assert_eq!(g("a [unbalanced"), owned(&[(10, "a [unbalanced")]));
        assert_eq!(
            g("((a][:b:c [d:3]"),
            owned(&[(3, "((a][:b:c "), (10, "((a][:b:c d")])
        );
        assert_eq!(g("[fe|||]male")[1], (2, "male".to_string()));
        let hires = |p: &str| schedule(p, 10, Some(10));
        assert_eq!(hires("a [b:.5] c"), owned(&[(10, "a b c")]));
        assert_eq!(hires("a [b:1.5] c"), owned(&[(5, "a  c"), (10, "a b c")]));
    }

    #[test]
    fn numbers_follow_lark() {
        for ok in ["3", "+3", "-3", "3.", ".5", "0.5", "1e3", "1.5E-2", ".5e1"] {
            assert!(is_signed_number(ok), "{ok}");
        }
        for bad in ["", ".", "e3", "1e", "1.2.3", "+", "1e+", "0x1", "1_0"] {
            assert!(!is_signed_number(bad), "{bad}");
        }
    }

    #[test]
    fn and_weights() {
        let parts = and_parts("a cat :1.2 AND a dog");
        assert_eq!(parts[0].text, "a cat");
        assert_eq!(parts[0].weight, 1.2);
        assert_eq!(parts[1].text, " a dog");
        assert_eq!(parts[1].weight, 1.0);
        assert_eq!(and_parts("ANDROID").len(), 1);
    }

    #[test]
    fn plan_encodes_each_text_once() {
        let plan = PromptPlan::new("[a|b] AND c :0.5", Some("[x:y:2]"), 4, None);
        assert_eq!(plan.texts, vec!["x", "y", "a", "b", " c"]);
        assert!(plan.composed());
        assert_eq!(plan.at(0), (vec![(2, 1.0), (4, 0.5)], Some(0)));
        // A1111 counts evaluations from 0 against ends from 1: 0 and 1 both take the first.
        assert_eq!(plan.at(1), (vec![(2, 1.0), (4, 0.5)], Some(0)));
        assert_eq!(plan.at(2), (vec![(3, 1.0), (4, 0.5)], Some(0)));
        assert_eq!(plan.at(3), (vec![(2, 1.0), (4, 0.5)], Some(1)));
        let plain = PromptPlan::new("a cat", None, 4, None);
        assert!(!plain.composed());
        assert_eq!(plain.at(2), (vec![(0, 1.0)], None));
    }

    #[test]
    fn entry_at_follows_reconstruct_cond_batch() {
        let s = [(3, 'a'), (10, 'b')];
        assert_eq!(entry_at(&s, 0), 0);
        assert_eq!(entry_at(&s, 3), 0);
        assert_eq!(entry_at(&s, 4), 1);
        assert_eq!(entry_at(&s, 11), 0);
    }
}
