//! API keys: where they come from (`API_KEYS`, `API_KEYS_FILE`), how a presented key is checked
//! (constant time, against digests only), and the key id the logs use instead of the key.

use std::fmt;
use std::path::Path;

use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

/// The sha256 of a key. The store keeps nothing else, so a memory dump or a log line never
/// holds a usable key, and `sha256:` entries of a keys file are stored as they are.
type KeyDigest = [u8; 32];

/// Names a key in logs and metrics: the first 8 hex digits of its sha256. Short enough to be
/// useless to an attacker (32 bits of a digest), long enough to tell an operator's keys apart.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyId(String);

impl KeyId {
    fn of(digest: &KeyDigest) -> Self {
        Self(hex(&digest[..4]))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn digest(key: &[u8]) -> KeyDigest {
    Sha256::digest(key).into()
}

/// The accepted keys; empty means authentication is off.
#[derive(Clone, Default)]
pub struct KeyStore {
    digests: Vec<KeyDigest>,
}

// Digests only, but still nothing a log needs: print the ids.
impl fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<KeyId> = self.digests.iter().map(KeyId::of).collect();
        f.debug_struct("KeyStore").field("key_ids", &ids).finish()
    }
}

/// Why the configured keys cannot be used; the server refuses to start rather than run open
/// when the operator asked for keys.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyConfigError {
    #[error("API_KEYS_FILE {path}: cannot read it: {why}")]
    Unreadable { path: String, why: String },
    #[error("API_KEYS_FILE {path} line {line}: {rule}")]
    BadLine {
        path: String,
        line: usize,
        rule: String,
    },
    #[error("API_KEYS_FILE {0} holds no key (blank lines and # comments only)")]
    EmptyFile(String),
    #[error("API_KEYS holds an empty key (two commas in a row, or a trailing comma)")]
    EmptyKey,
}

impl KeyStore {
    /// Keys from `API_KEYS` (comma-separated; unset or blank: none) and `API_KEYS_FILE` (one a
    /// line, `sha256:<64 hex>` for a digest, blank lines and `#` comments skipped). Both may be set.
    pub fn load(
        api_keys: Option<&str>,
        api_keys_file: Option<&Path>,
    ) -> Result<Self, KeyConfigError> {
        let mut store = Self::default();
        if let Some(list) = api_keys.filter(|s| !s.trim().is_empty()) {
            for key in list.split(',') {
                let key = key.trim();
                if key.is_empty() {
                    return Err(KeyConfigError::EmptyKey);
                }
                store.digests.push(digest(key.as_bytes()));
            }
        }
        if let Some(path) = api_keys_file {
            let shown = path.display().to_string();
            let text = std::fs::read_to_string(path).map_err(|e| KeyConfigError::Unreadable {
                path: shown.clone(),
                why: e.to_string(),
            })?;
            let before = store.digests.len();
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let d = parse_file_line(line).map_err(|rule| KeyConfigError::BadLine {
                    path: shown.clone(),
                    line: i + 1,
                    rule,
                })?;
                store.digests.push(d);
            }
            if store.digests.len() == before {
                return Err(KeyConfigError::EmptyFile(shown));
            }
        }
        store.digests.sort_unstable();
        store.digests.dedup();
        Ok(store)
    }

    pub fn enabled(&self) -> bool {
        !self.digests.is_empty()
    }

    pub fn len(&self) -> usize {
        self.digests.len()
    }

    pub fn key_ids(&self) -> Vec<KeyId> {
        self.digests.iter().map(KeyId::of).collect()
    }

    /// The id of the matching key, or `None`. The presented key is hashed first, so what is
    /// compared never shares a prefix with the real key in any way an attacker controls; the
    /// comparison itself is constant time and visits every stored digest whatever matches.
    pub fn verify(&self, presented: &[u8]) -> Option<KeyId> {
        let d = digest(presented);
        let mut found = Choice::from(0u8);
        let mut which = 0usize;
        for (i, stored) in self.digests.iter().enumerate() {
            let hit = stored.ct_eq(&d);
            found |= hit;
            // Branch-free select of the index of the (unique, after dedup) hit.
            let mask = (hit.unwrap_u8() as usize).wrapping_neg();
            which |= i & mask;
        }
        bool::from(found).then(|| KeyId::of(&self.digests[which]))
    }
}

fn parse_file_line(line: &str) -> Result<KeyDigest, String> {
    let Some(hexpart) = line.strip_prefix("sha256:") else {
        return Ok(digest(line.as_bytes()));
    };
    let hexpart = hexpart.trim();
    if hexpart.len() != 64 || !hexpart.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("a sha256: entry needs exactly 64 hex digits (the key's sha256)".into());
    }
    let mut out = [0u8; 32];
    for (i, chunk) in hexpart.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).map_err(|e| e.to_string())?;
        out[i] = u8::from_str_radix(s, 16).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// The key a request presents: `Authorization: Bearer <key>` or `X-Api-Key: <key>`.
/// `Err` when a header is there but unusable (so the 401 can say why).
pub fn presented_key(headers: &axum::http::HeaderMap) -> Result<Option<&[u8]>, &'static str> {
    if let Some(v) = headers.get("x-api-key") {
        let v = v.as_bytes().trim_ascii();
        return if v.is_empty() {
            Err("the X-Api-Key header is empty")
        } else {
            Ok(Some(v))
        };
    }
    let Some(v) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let v = v.as_bytes().trim_ascii();
    match v.iter().position(|&b| b == b' ') {
        Some(n) if v[..n].eq_ignore_ascii_case(b"bearer") => {
            let key = v[n + 1..].trim_ascii();
            if key.is_empty() {
                Err("the Bearer token is empty")
            } else {
                Ok(Some(key))
            }
        }
        _ => Err("the Authorization header must be `Bearer <key>`"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderValue};

    fn sha_hex(key: &str) -> String {
        hex(&digest(key.as_bytes()))
    }

    #[test]
    fn plain_and_hashed_keys_verify_and_others_do_not() {
        let dir = std::env::temp_dir().join(format!("sdserve-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("keys");
        std::fs::write(
            &file,
            format!(
                "# operators\n\nfile-plain-key\nsha256:{}\n  sha256:{}  \n",
                sha_hex("hashed-key"),
                sha_hex("hashed-key-2").to_uppercase()
            ),
        )
        .unwrap();
        let store = KeyStore::load(Some(" env-a , env-b"), Some(&file)).unwrap();
        assert_eq!(store.len(), 5);
        for k in [
            "env-a",
            "env-b",
            "file-plain-key",
            "hashed-key",
            "hashed-key-2",
        ] {
            let id = store.verify(k.as_bytes()).unwrap_or_else(|| panic!("{k}"));
            assert_eq!(id.to_string(), sha_hex(k)[..8]);
        }
        for k in ["", "env", "env-a ", "ENV-A", "hashed", "# operators"] {
            assert!(store.verify(k.as_bytes()).is_none(), "{k:?}");
        }
        // A digest is not a key: presenting the sha256 line itself does not get in.
        let line = format!("sha256:{}", sha_hex("hashed-key"));
        assert!(store.verify(line.as_bytes()).is_none());
        assert!(store.verify(sha_hex("hashed-key").as_bytes()).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_configurations_are_refused() {
        assert!(!KeyStore::load(None, None).unwrap().enabled());
        assert!(!KeyStore::load(Some("  "), None).unwrap().enabled());
        assert_eq!(
            KeyStore::load(Some("a,,b"), None).unwrap_err(),
            KeyConfigError::EmptyKey
        );
        let dir = std::env::temp_dir().join(format!("sdserve-keys-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("k");
        std::fs::write(&f, "# nothing\n\n").unwrap();
        assert!(matches!(
            KeyStore::load(None, Some(&f)),
            Err(KeyConfigError::EmptyFile(_))
        ));
        std::fs::write(&f, "ok\nsha256:abc\n").unwrap();
        let e = KeyStore::load(None, Some(&f)).unwrap_err();
        assert!(matches!(e, KeyConfigError::BadLine { line: 2, .. }), "{e}");
        assert!(matches!(
            KeyStore::load(None, Some(&dir.join("missing"))),
            Err(KeyConfigError::Unreadable { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn debug_output_names_ids_not_keys() {
        let store = KeyStore::load(Some("super-secret-value"), None).unwrap();
        let shown = format!("{store:?}");
        assert!(!shown.contains("super-secret"), "{shown}");
        assert!(
            shown.contains(&sha_hex("super-secret-value")[..8]),
            "{shown}"
        );
    }

    #[test]
    fn header_forms() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_key(&h), Ok(None));
        h.insert("authorization", HeaderValue::from_static("Bearer  k1 "));
        assert_eq!(presented_key(&h), Ok(Some(&b"k1"[..])));
        h.insert("authorization", HeaderValue::from_static("bearer k1"));
        assert_eq!(presented_key(&h), Ok(Some(&b"k1"[..])));
        h.insert("authorization", HeaderValue::from_static("Basic dTpw"));
        assert!(presented_key(&h).is_err());
        h.insert("authorization", HeaderValue::from_static("Bearer "));
        assert!(presented_key(&h).is_err());
        h.insert("x-api-key", HeaderValue::from_static("k2"));
        assert_eq!(presented_key(&h), Ok(Some(&b"k2"[..])));
    }

    /// Wrong keys that share 0, half or all-but-one bytes with the real key take the same time.
    /// Batches of the three cases are interleaved and each case's fastest batch is compared
    /// with a loose bound (load only ever adds time, so the fastest of 31 is the case's own
    /// cost; medians failed 2 of 4 runs at load 8 on 2 cores); a naive early-exit compare of hashed keys would pass
    /// too (hashing destroys the prefix), which is the point of hashing first. This guards
    /// against a regression to comparing the raw presented bytes with the raw stored key.
    #[test]
    fn wrong_key_time_does_not_depend_on_matched_prefix() {
        let real = "k".repeat(64);
        let store = KeyStore::load(Some(&format!("{real},other-key-1,other-key-2")), None).unwrap();
        let cases = [
            "x".repeat(64),
            format!("{}{}", "k".repeat(32), "x".repeat(32)),
            format!("{}x", "k".repeat(63)),
        ];
        const BATCH: usize = 2000;
        let mut fastest = Vec::new();
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
        for _ in 0..31 {
            for (i, c) in cases.iter().enumerate() {
                let t = std::time::Instant::now();
                for _ in 0..BATCH {
                    assert!(std::hint::black_box(&store)
                        .verify(std::hint::black_box(c.as_bytes()))
                        .is_none());
                }
                samples[i].push(t.elapsed().as_secs_f64());
            }
        }
        for s in &samples {
            fastest.push(s.iter().copied().fold(f64::MAX, f64::min));
        }
        let (lo, hi) = fastest
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), &m| (lo.min(m), hi.max(m)));
        assert!(hi / lo < 1.5, "fastest batch times {fastest:?}");
    }
}
