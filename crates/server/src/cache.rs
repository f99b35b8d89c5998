//! Response cache for deterministic requests (explicit seed): an LRU bounded in bytes.
//! An entry holds the `/generate` 200 body with its first image once (the body repeats it in
//! `image_base64` and `images[0]`), and a hit builds the body again, byte for byte.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::Mutex;

use axum::body::Bytes;

/// A `/generate` 200 body as the cache holds it: the JSON less the second copy of the first
/// image, and where that copy goes back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedBody {
    compact: Bytes,
    /// The first image's place in `compact`, and where its copy is put back.
    repeat: Option<(Range<usize>, usize)>,
}

/// The start of the body as serde writes `GenerateResponse`: `image_base64`, then `images`.
const FIRST_FIELD: &[u8] = b"{\"image_base64\":\"";
const IMAGES_FIELD: &[u8] = b"\",\"images\":[\"";
/// Marks `CachedBody::to_wire` bytes (the shared cache in Redis).
const WIRE_MAGIC: &[u8; 4] = b"sdc1";

impl CachedBody {
    /// `body` held with its first image once, when it starts as serde writes a response with
    /// `images[0] == image_base64` (base64 needs no JSON escapes); otherwise held whole.
    pub fn of(body: &[u8]) -> Self {
        let whole = || Self {
            compact: Bytes::copy_from_slice(body),
            repeat: None,
        };
        let Some(rest) = body.strip_prefix(FIRST_FIELD) else {
            return whole();
        };
        let Some(len) = rest.iter().position(|&b| b == b'"') else {
            return whole();
        };
        let first = FIRST_FIELD.len()..FIRST_FIELD.len() + len;
        let copy_at = first.end + IMAGES_FIELD.len();
        let repeats = body[first.end..].starts_with(IMAGES_FIELD)
            && body.get(copy_at..copy_at + len) == Some(&body[first.clone()])
            && body.get(copy_at + len) == Some(&b'"');
        if !repeats {
            return whole();
        }
        let mut compact = Vec::with_capacity(body.len() - len);
        compact.extend_from_slice(&body[..copy_at]);
        compact.extend_from_slice(&body[copy_at + len..]);
        Self {
            compact: compact.into(),
            repeat: Some((first, copy_at)),
        }
    }

    /// The body as it was given to `of`.
    pub fn body(&self) -> Bytes {
        let Some((first, at)) = &self.repeat else {
            return self.compact.clone();
        };
        let c = &self.compact;
        let mut body = Vec::with_capacity(c.len() + first.len());
        body.extend_from_slice(&c[..*at]);
        body.extend_from_slice(&c[first.clone()]);
        body.extend_from_slice(&c[*at..]);
        body.into()
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.compact.len()
    }

    /// As stored in the shared cache: a tag, the two offsets, the compact body.
    pub fn to_wire(&self) -> Vec<u8> {
        let (first, at) = self.repeat.clone().unwrap_or((0..0, 0));
        let mut out = Vec::with_capacity(WIRE_MAGIC.len() + 24 + self.compact.len());
        out.extend_from_slice(WIRE_MAGIC);
        for n in [first.start, first.end, at] {
            out.extend_from_slice(&(n as u64).to_le_bytes());
        }
        out.extend_from_slice(&self.compact);
        out
    }

    /// `to_wire`'s bytes back; `None` for anything else (checked, as Redis is outside input).
    pub fn from_wire(wire: &[u8]) -> Option<Self> {
        let rest = wire.strip_prefix(WIRE_MAGIC)?;
        let n = |i: usize| -> Option<usize> {
            let b: [u8; 8] = rest.get(i * 8..i * 8 + 8)?.try_into().ok()?;
            usize::try_from(u64::from_le_bytes(b)).ok()
        };
        let (start, end, at) = (n(0)?, n(1)?, n(2)?);
        let compact = Bytes::copy_from_slice(rest.get(24..)?);
        let repeat = if end == 0 {
            None
        } else if start < end && end <= compact.len() && at <= compact.len() {
            Some((start..end, at))
        } else {
            return None;
        };
        Some(Self { compact, repeat })
    }
}

struct Entry {
    body: CachedBody,
    tick: u64,
}

struct Inner {
    map: HashMap<String, Entry>,
    /// Recency order: tick -> key; the smallest tick is the least recently used.
    order: BTreeMap<u64, String>,
    bytes: usize,
    next_tick: u64,
}

pub struct ResponseCache {
    max_bytes: usize,
    inner: Mutex<Inner>,
}

impl ResponseCache {
    /// `None` when `max_bytes` is 0 (cache off).
    pub fn new(max_bytes: usize) -> Option<Self> {
        (max_bytes > 0).then(|| Self {
            max_bytes,
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                order: BTreeMap::new(),
                bytes: 0,
                next_tick: 0,
            }),
        })
    }

    fn cost(key: &str, body: &CachedBody) -> usize {
        key.len() + body.len()
    }

    pub fn get(&self, key: &str) -> Option<CachedBody> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *g;
        let tick = inner.next_tick;
        let entry = inner.map.get_mut(key)?;
        inner.order.remove(&entry.tick);
        entry.tick = tick;
        inner.order.insert(tick, key.to_string());
        inner.next_tick += 1;
        Some(entry.body.clone())
    }

    /// Inserts, evicting least recently used entries; an entry larger than the whole cache is skipped.
    pub fn insert(&self, key: String, body: CachedBody) {
        let cost = Self::cost(&key, &body);
        if cost > self.max_bytes {
            return;
        }
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *g;
        if let Some(old) = inner.map.remove(&key) {
            inner.order.remove(&old.tick);
            inner.bytes -= Self::cost(&key, &old.body);
        }
        while inner.bytes + cost > self.max_bytes {
            let Some((_, victim)) = inner.order.pop_first() else {
                break;
            };
            if let Some(old) = inner.map.remove(&victim) {
                inner.bytes -= Self::cost(&victim, &old.body);
            }
        }
        let tick = inner.next_tick;
        inner.next_tick += 1;
        inner.order.insert(tick, key.clone());
        inner.bytes += cost;
        inner.map.insert(key, Entry { body, tick });
    }

    pub fn len_and_bytes(&self) -> (usize, usize) {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        (g.map.len(), g.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_at_zero() {
        assert!(ResponseCache::new(0).is_none());
    }

    fn raw(b: Vec<u8>) -> CachedBody {
        CachedBody::of(&b)
    }

    #[test]
    fn evicts_least_recently_used_by_bytes() {
        let c = ResponseCache::new(30).unwrap();
        c.insert("a".into(), raw(vec![0; 9])); // cost 10
        c.insert("b".into(), raw(vec![1; 9]));
        c.insert("c".into(), raw(vec![2; 9]));
        assert_eq!(c.len_and_bytes(), (3, 30));
        assert!(c.get("a").is_some()); // a is now most recent; b is the LRU
        c.insert("d".into(), raw(vec![3; 9]));
        assert!(c.get("b").is_none());
        assert!(c.get("a").is_some() && c.get("c").is_some() && c.get("d").is_some());
        c.insert("big".into(), raw(vec![0; 100]));
        assert!(c.get("big").is_none());
        assert_eq!(c.len_and_bytes(), (3, 30));
        // Replacing a key does not double-count it.
        c.insert("a".into(), raw(vec![5; 4]));
        assert_eq!(c.len_and_bytes(), (3, 25));
        assert_eq!(c.get("a").unwrap().body()[0], 5);
    }

    fn response(images: &[&str]) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "image_base64": images[0],
            "images": images,
            "metadata": {"seed": 1, "note": "\"quoted\""},
        }))
        .unwrap()
    }

    #[test]
    fn a_body_comes_back_byte_for_byte_holding_its_first_image_once() {
        let a = "QUFB".repeat(100);
        let b = "QkJC".repeat(90);
        for images in [vec![a.as_str()], vec![a.as_str(), b.as_str()]] {
            let body = response(&images);
            let held = CachedBody::of(&body);
            assert_eq!(held.len(), body.len() - a.len());
            assert_eq!(held.body(), body);
            let back = CachedBody::from_wire(&held.to_wire()).unwrap();
            assert_eq!(back, held);
            assert_eq!(back.body(), body);
        }
        // Anything else is held whole, and still comes back.
        for other in [
            b"{\"metadata\":{}}".to_vec(),
            serde_json::to_vec(&serde_json::json!({"image_base64": "QQ==", "images": ["Qg=="]}))
                .unwrap(),
            b"{\"image_base64\":\"QQ==\",\"images\":[\"QQ==x".to_vec(),
            Vec::new(),
        ] {
            let held = CachedBody::of(&other);
            assert_eq!(held.len(), other.len());
            assert_eq!(held.body(), other);
            assert_eq!(
                CachedBody::from_wire(&held.to_wire()).unwrap().body(),
                other
            );
        }
        // Wire bytes that are not ours, or whose offsets do not fit, are refused.
        assert!(CachedBody::from_wire(&body_of_old_replica()).is_none());
        let mut bad = CachedBody::of(&response(&[&a])).to_wire();
        bad[4..12].copy_from_slice(&(u64::MAX).to_le_bytes());
        assert!(CachedBody::from_wire(&bad).is_none());
    }

    fn body_of_old_replica() -> Vec<u8> {
        response(&["QUFB"])
    }
}
