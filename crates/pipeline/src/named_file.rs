//! A model file a request names (an upscaler network, a ControlNet): known by its name and
//! path, read the first time it is needed, or handed over already loaded (the server's
//! caches). Two are equal, and print the same, when name and path are: loaded or not, they
//! make the same images (the server's cache key writes requests with `Debug`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

pub struct NamedFile<T> {
    pub name: String,
    /// The file or folder; empty for one known by its name only until it runs
    /// ([`Self::named`]: the worker finds it in its own folder and hands it over).
    pub path: PathBuf,
    loaded: OnceLock<Result<Arc<T>, String>>,
}

impl<T> std::fmt::Debug for NamedFile<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = std::any::type_name::<T>().rsplit("::").next().unwrap_or("");
        f.debug_struct("NamedFile")
            .field("kind", &kind)
            .field("name", &self.name)
            .field("path", &self.path)
            .finish()
    }
}

impl<T> PartialEq for NamedFile<T> {
    fn eq(&self, other: &Self) -> bool {
        (&self.name, &self.path) == (&other.name, &other.path)
    }
}

impl<T> Eq for NamedFile<T> {}

impl<T> NamedFile<T> {
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            path: path.into(),
            loaded: OnceLock::new(),
        }
    }

    /// Known by its name alone, to be found where it runs.
    pub fn named(name: impl Into<String>) -> Self {
        Self::new(name, PathBuf::new())
    }

    /// With its model already loaded (from `path`).
    pub fn with_loaded(name: impl Into<String>, path: impl Into<PathBuf>, model: Arc<T>) -> Self {
        let me = Self::new(name, path);
        let _ = me.loaded.set(Ok(model));
        me
    }

    /// The model: `read` from the path on first use (blocking); one handed over or read
    /// before is used as it is. Without a path: an error naming the `what` and the `folder`
    /// that did not have it.
    pub fn get_or_read(
        &self,
        what: &str,
        folder: &str,
        read: impl FnOnce(&Path) -> Result<T, String>,
    ) -> Result<&Arc<T>, String> {
        self.loaded
            .get_or_init(|| {
                if self.path.as_os_str().is_empty() {
                    return Err(format!(
                        "the {what} {:?} was not found in {folder}",
                        self.name
                    ));
                }
                read(&self.path).map(Arc::new)
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// As [`Self::get_or_read`], but a model read now is not kept: it lives as long as the
    /// returned value (a large model used once per request, freed right after).
    pub fn get_or_read_once(
        &self,
        what: &str,
        folder: &str,
        read: impl FnOnce(&Path) -> Result<T, String>,
    ) -> Result<Arc<T>, String> {
        if let Some(loaded) = self.loaded.get() {
            return loaded.clone();
        }
        if self.path.as_os_str().is_empty() {
            return Err(format!(
                "the {what} {:?} was not found in {folder}",
                self.name
            ));
        }
        read(&self.path).map(Arc::new)
    }
}

/// A part of A1111's `natural_sort_key`: text (lowercased) and numbers alternate, text first.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum NaturalPart {
    Text(String),
    /// A run of digits by value: its length without leading zeros, then the digits.
    Number(usize, String),
}

/// A1111's `shared.natural_sort_key`: `[int(t) if t.isdigit() else t.lower() for t in
/// re.split('([0-9]+)', s)]`, compared as Python compares lists.
pub fn natural_sort_key(s: &str) -> Vec<NaturalPart> {
    let mut parts = Vec::new();
    let mut rest = s;
    loop {
        let digits_at = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        parts.push(NaturalPart::Text(rest[..digits_at].to_lowercase()));
        rest = &rest[digits_at..];
        if rest.is_empty() {
            return parts;
        }
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let value = rest[..end].trim_start_matches('0');
        parts.push(NaturalPart::Number(value.len(), value.to_string()));
        rest = &rest[end..];
    }
}

#[cfg(test)]
mod tests {
    use super::natural_sort_key;

    #[test]
    fn natural_order_compares_numbers_by_value_and_text_without_case() {
        assert!(natural_sort_key("a2.pt") < natural_sort_key("a10.pt"));
        assert!(natural_sort_key("a010") == natural_sort_key("A10"));
        assert!(
            natural_sort_key("codeformer-v0.1.0.pth")
                < natural_sort_key("detection_Resnet50_Final.pth")
        );
    }
}
