//! JSON config files as Python's `json` module reads them, for every config reader of the crate
//! (and the server's): diffusers' `save_config` and transformers write `json.dumps`, which puts
//! non-finite floats as the bare tokens `NaN`, `Infinity` and `-Infinity` (a DPMSolverMultistep
//! config carries `"lambda_min_clipped": -Infinity`, its default). serde_json refuses those.
//!
//! The grammar is `json.loads`': those three tokens outside strings, floats correctly rounded
//! (`1e400` is infinity, as `float()` makes it), a repeated key keeps its last value. Strings and
//! integers are decoded by serde_json itself. Values go to any `Deserialize` type; in a
//! `serde_json::Value` a non-finite number becomes `null`, as serde_json represents none.

use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};

/// Nesting past this is refused, as serde_json does (a stack overflow is no answer to a file).
const MAX_DEPTH: usize = 128;

/// Parses `text` into `T`. Errors name the line and column, or the key whose value is wrong.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, serde_json::Error> {
    let node = Parser {
        bytes: text.as_bytes(),
        text,
        pos: 0,
        depth: 0,
    }
    .document()?;
    T::deserialize(node)
}

/// [`from_str`] on bytes, which must be UTF-8 (as `open(path, encoding="utf-8")` reads them).
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, serde_json::Error> {
    let text = std::str::from_utf8(bytes).map_err(de::Error::custom)?;
    from_str(text)
}

/// A parsed value; `Float` holds what serde_json's `Number` cannot (non-finite floats).
#[derive(Debug)]
enum Node {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    Float(f64),
    String(String),
    Array(Vec<Node>),
    Object(Vec<(String, Node)>),
}

struct Parser<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
    depth: usize,
}

impl Parser<'_> {
    fn document(mut self) -> Result<Node, serde_json::Error> {
        let node = self.value()?;
        self.skip_whitespace();
        if self.pos < self.bytes.len() {
            return Err(self.error("trailing characters"));
        }
        Ok(node)
    }

    fn error(&self, what: &str) -> serde_json::Error {
        let mut end = self.pos.min(self.text.len());
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        let before = &self.text[..end];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        de::Error::custom(format!("{what} at line {line} column {column}"))
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.pos) {
            self.pos += 1;
        }
    }

    /// Consumes `word` if the text continues with it.
    fn eat(&mut self, word: &str) -> bool {
        let found = self.bytes[self.pos..].starts_with(word.as_bytes());
        if found {
            self.pos += word.len();
        }
        found
    }

    fn value(&mut self) -> Result<Node, serde_json::Error> {
        self.skip_whitespace();
        let literals = [
            ("null", Node::Null),
            ("true", Node::Bool(true)),
            ("false", Node::Bool(false)),
            ("NaN", Node::Float(f64::NAN)),
            ("Infinity", Node::Float(f64::INFINITY)),
            ("-Infinity", Node::Float(f64::NEG_INFINITY)),
        ];
        for (word, node) in literals {
            if self.eat(word) {
                return Ok(node);
            }
        }
        match self.bytes.get(self.pos) {
            Some(b'"') => self.string().map(Node::String),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b'[') => self.nested(Self::array),
            Some(b'{') => self.nested(Self::object),
            Some(_) => Err(self.error("expected a value")),
            None => Err(self.error("EOF while parsing a value")),
        }
    }

    fn nested(
        &mut self,
        parse: fn(&mut Self) -> Result<Node, serde_json::Error>,
    ) -> Result<Node, serde_json::Error> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.error("recursion limit exceeded"));
        }
        let node = parse(self)?;
        self.depth -= 1;
        Ok(node)
    }

    /// Python's `NUMBER_RE`: `-?(0|[1-9]\d*)(\.\d+)?([eE][-+]?\d+)?`; an integer when it has
    /// neither fraction nor exponent.
    fn number(&mut self) -> Result<Node, serde_json::Error> {
        let start = self.pos;
        let digits = |p: &mut Self| {
            let from = p.pos;
            while p.bytes.get(p.pos).is_some_and(u8::is_ascii_digit) {
                p.pos += 1;
            }
            p.pos > from
        };
        self.eat("-");
        if !self.eat("0") && !digits(self) {
            return Err(self.error("invalid number"));
        }
        let mut float = false;
        if self.bytes.get(self.pos) == Some(&b'.') {
            self.pos += 1;
            float = true;
            if !digits(self) {
                return Err(self.error("invalid number"));
            }
        }
        if let Some(b'e' | b'E') = self.bytes.get(self.pos) {
            self.pos += 1;
            float = true;
            if let Some(b'+' | b'-') = self.bytes.get(self.pos) {
                self.pos += 1;
            }
            if !digits(self) {
                return Err(self.error("invalid number"));
            }
        }
        let token = &self.text[start..self.pos];
        if float {
            // Rust's parse rounds correctly, as Python's `float()`; overflow is infinity.
            let x: f64 = token.parse().map_err(|_| self.error("invalid number"))?;
            return Ok(serde_json::Number::from_f64(x).map_or(Node::Float(x), Node::Number));
        }
        // Integers past u64/i64 become floats, as serde_json reads them.
        serde_json::from_str(token)
            .map(Node::Number)
            .map_err(|_| self.error("invalid number"))
    }

    /// The string token, decoded by serde_json (escapes, surrogate pairs, and control
    /// characters refused, as Python's `strict=True`).
    fn string(&mut self) -> Result<String, serde_json::Error> {
        let start = self.pos;
        self.pos += 1;
        loop {
            match self.bytes.get(self.pos) {
                Some(b'"') => break,
                Some(b'\\') => self.pos += 2,
                Some(_) => self.pos += 1,
                None => return Err(self.error("EOF while parsing a string")),
            }
        }
        self.pos += 1;
        let token = &self.text[start..self.pos];
        serde_json::from_str(token).map_err(|e| {
            self.pos = start;
            self.error(&format!("bad string ({e})"))
        })
    }

    /// Skips whitespace, then consumes `close` (true) or `,` (false); anything else is an error.
    fn separator(&mut self, close: u8) -> Result<bool, serde_json::Error> {
        self.skip_whitespace();
        match self.bytes.get(self.pos) {
            Some(&b) if b == close => {
                self.pos += 1;
                Ok(true)
            }
            Some(b',') => {
                self.pos += 1;
                Ok(false)
            }
            _ => Err(self.error(&format!("expected `,` or `{}`", close as char))),
        }
    }

    fn array(&mut self) -> Result<Node, serde_json::Error> {
        self.pos += 1;
        let mut items = Vec::new();
        self.skip_whitespace();
        if self.eat("]") {
            return Ok(Node::Array(items));
        }
        loop {
            items.push(self.value()?);
            if self.separator(b']')? {
                return Ok(Node::Array(items));
            }
        }
    }

    fn object(&mut self) -> Result<Node, serde_json::Error> {
        self.pos += 1;
        let mut pairs: Vec<(String, Node)> = Vec::new();
        // A repeated key keeps its first place and its last value, as a Python dict does.
        let mut index = std::collections::HashMap::new();
        self.skip_whitespace();
        if self.eat("}") {
            return Ok(Node::Object(pairs));
        }
        loop {
            self.skip_whitespace();
            if self.bytes.get(self.pos) != Some(&b'"') {
                return Err(self.error("expected a key (a string)"));
            }
            let key = self.string()?;
            self.skip_whitespace();
            if !self.eat(":") {
                return Err(self.error("expected `:`"));
            }
            let value = self.value()?;
            match index.get(&key) {
                Some(&i) => pairs[i] = (key, value),
                None => {
                    index.insert(key.clone(), pairs.len());
                    pairs.push((key, value));
                }
            }
            if self.separator(b'}')? {
                return Ok(Node::Object(pairs));
            }
        }
    }
}

impl<'de> de::Deserializer<'de> for Node {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self {
            Node::Null => visitor.visit_unit(),
            Node::Bool(b) => visitor.visit_bool(b),
            Node::Number(n) => n.deserialize_any(visitor),
            Node::Float(x) => visitor.visit_f64(x),
            Node::String(s) => visitor.visit_string(s),
            Node::Array(items) => {
                let mut seq = de::value::SeqDeserializer::new(items.into_iter());
                let out = visitor.visit_seq(&mut seq)?;
                seq.end()?;
                Ok(out)
            }
            Node::Object(pairs) => visitor.visit_map(ObjectAccess::new(pairs)),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self {
            Node::Null => visitor.visit_none(),
            other => visitor.visit_some(other),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        match self {
            Node::String(s) => visitor.visit_enum(s.into_deserializer()),
            Node::Object(pairs) if pairs.len() == 1 => visitor.visit_enum(
                de::value::MapAccessDeserializer::new(ObjectAccess::new(pairs)),
            ),
            other => other.deserialize_any(visitor),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_newtype_struct(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct seq tuple tuple_struct map struct identifier ignored_any
    }
}

impl IntoDeserializer<'_, serde_json::Error> for Node {
    type Deserializer = Self;
    fn into_deserializer(self) -> Self {
        self
    }
}

/// An object's pairs; a value's error is prefixed with its key (serde's own errors name the
/// expected type, not where it was).
struct ObjectAccess {
    pairs: std::vec::IntoIter<(String, Node)>,
    pending: Option<(String, Node)>,
}

impl ObjectAccess {
    fn new(pairs: Vec<(String, Node)>) -> Self {
        Self {
            pairs: pairs.into_iter(),
            pending: None,
        }
    }
}

impl<'de> MapAccess<'de> for ObjectAccess {
    type Error = serde_json::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        let Some((key, value)) = self.pairs.next() else {
            return Ok(None);
        };
        let out = seed.deserialize(de::value::StrDeserializer::<serde_json::Error>::new(&key))?;
        self.pending = Some((key, value));
        Ok(Some(out))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Self::Error> {
        let (key, value) = self
            .pending
            .take()
            .ok_or_else(|| de::Error::custom("a value asked before its key"))?;
        seed.deserialize(value)
            .map_err(|e| de::Error::custom(format!("{key}: {e}")))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.pairs.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[derive(Debug, serde::Deserialize)]
    struct Floats {
        a: f64,
        b: Option<f64>,
        c: Vec<f64>,
        s: String,
    }

    #[test]
    fn python_tokens_outside_strings_are_floats() {
        let f: Floats = from_str(
            r#"{"a": -Infinity, "b": NaN, "c": [Infinity, 1.5, -0.0, 1e400], "s": "-Infinity"}"#,
        )
        .unwrap();
        assert_eq!(f.a, f64::NEG_INFINITY);
        assert!(f.b.unwrap().is_nan());
        assert_eq!(f.c[0], f64::INFINITY);
        assert_eq!(f.c[1], 1.5);
        assert!(f.c[2] == 0.0 && f.c[2].is_sign_negative());
        assert_eq!(f.c[3], f64::INFINITY);
        assert_eq!(f.s, "-Infinity");
    }

    #[test]
    fn tokens_inside_strings_stay_text() {
        let v: Value =
            from_str(r#"{"k": "Infinity \"NaN\" -Infinity", "NaN": [1, "NaN"]}"#).unwrap();
        assert_eq!(
            v,
            json!({"k": "Infinity \"NaN\" -Infinity", "NaN": [1, "NaN"]})
        );
        // In a serde_json Value a non-finite number is null: it has no other form.
        let v: Value = from_str(r#"{"x": -Infinity, "y": 2}"#).unwrap();
        assert_eq!(v, json!({"x": null, "y": 2}));
    }

    #[test]
    fn plain_json_reads_as_serde_json_reads_it() {
        let text = r#" {"a": [1, -2, 3.25, 18446744073709551615, 1e3, 0.1, 5e-324, true, null],
            "b": {"c": "\u00e9\ud83d\ude00\n\t\\\"", "d": []}, "e": {}, "f": -0, "g": 12345678901234567890123} "#;
        let ours: Value = from_str(text).unwrap();
        let theirs: Value = serde_json::from_str(text).unwrap();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn repeated_keys_keep_the_last_value() {
        let v: Value = from_str(r#"{"a": 1, "b": 2, "a": 3}"#).unwrap();
        assert_eq!(v, json!({"a": 3, "b": 2}));
        #[derive(serde::Deserialize)]
        struct A {
            a: u32,
        }
        assert_eq!(from_str::<A>(r#"{"a": 1, "a": 3}"#).unwrap().a, 3);
    }

    #[test]
    fn what_python_refuses_is_refused() {
        for bad in [
            "",
            "{",
            "[1,]",
            "{\"a\": 1,}",
            "01",
            "1.",
            ".5",
            "+1",
            "-",
            "1e",
            "infinity",
            "-NaN",
            "+Infinity",
            "nan",
            "{'a': 1}",
            "\"a\u{1}b\"",
            "[1] 2",
            "\u{feff}{}",
            "{\"a\" 1}",
            "\"\\x41\"",
        ] {
            assert!(from_str::<Value>(bad).is_err(), "{bad:?} parsed");
        }
        let deep = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert!(from_str::<Value>(&deep).is_err());
        let ok = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        assert!(from_str::<Value>(&ok).is_ok());
    }

    #[test]
    fn errors_say_where() {
        let e = from_str::<Value>("{\n  \"a\": 1,\n  \"b\": nope\n}").unwrap_err();
        assert!(e.to_string().contains("line 3 column 8"), "{e}");
        let e = from_str::<Floats>(r#"{"a": "x", "b": null, "c": [], "s": ""}"#).unwrap_err();
        assert!(e.to_string().starts_with("a: invalid type"), "{e}");
    }

    #[test]
    fn enums_options_and_unknown_keys() {
        #[derive(Debug, PartialEq, serde::Deserialize)]
        #[serde(rename_all = "snake_case")]
        enum Act {
            Gelu,
            QuickGelu,
        }
        #[derive(Debug, PartialEq, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct C {
            act: Act,
            opt: Option<u32>,
            pair: (u8, String),
        }
        let c: C = from_str(r#"{"act": "quick_gelu", "opt": null, "pair": [1, "x"]}"#).unwrap();
        assert_eq!(
            c,
            C {
                act: Act::QuickGelu,
                opt: None,
                pair: (1, "x".into())
            }
        );
        assert!(from_str::<C>(r#"{"act": "gelu", "opt": 1, "pair": [1, "x"], "z": 0}"#).is_err());
        assert!(from_str::<C>(r#"{"act": "relu", "opt": 1, "pair": [1, "x"]}"#).is_err());
        assert_eq!(from_str::<Act>(r#""gelu""#).unwrap(), Act::Gelu);
    }
}
