//! Response cache for deterministic requests (explicit seed): an LRU bounded in bytes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use axum::body::Bytes;

struct Entry {
    body: Bytes,
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

    fn cost(key: &str, body: &Bytes) -> usize {
        key.len() + body.len()
    }

    pub fn get(&self, key: &str) -> Option<Bytes> {
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
    pub fn insert(&self, key: String, body: Bytes) {
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

    #[test]
    fn evicts_least_recently_used_by_bytes() {
        let c = ResponseCache::new(30).unwrap();
        c.insert("a".into(), Bytes::from(vec![0; 9])); // cost 10
        c.insert("b".into(), Bytes::from(vec![1; 9]));
        c.insert("c".into(), Bytes::from(vec![2; 9]));
        assert_eq!(c.len_and_bytes(), (3, 30));
        assert!(c.get("a").is_some()); // a is now most recent; b is the LRU
        c.insert("d".into(), Bytes::from(vec![3; 9]));
        assert!(c.get("b").is_none());
        assert!(c.get("a").is_some() && c.get("c").is_some() && c.get("d").is_some());
        c.insert("big".into(), Bytes::from(vec![0; 100]));
        assert!(c.get("big").is_none());
        assert_eq!(c.len_and_bytes(), (3, 30));
        // Replacing a key does not double-count it.
        c.insert("a".into(), Bytes::from(vec![5; 4]));
        assert_eq!(c.len_and_bytes(), (3, 25));
        assert_eq!(c.get("a").unwrap()[0], 5);
    }
}
