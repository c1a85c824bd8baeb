//! What the Hugging Face environment variables say, read as `huggingface_hub` reads them
//! (`huggingface_hub/constants.py` and `utils/_auth.py`), into one explicit value.
//!
//! Only [`HubSettings::from_env`] touches the process environment; everything else takes the
//! settings as an argument, so tests pass their own variables without racing on global state.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

/// The hub used when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Where and how to reach the hub, and where its cache is.
#[derive(Clone, PartialEq, Eq)]
pub struct HubSettings {
    /// Base URL, without a trailing `/`: `HF_ENDPOINT`, else `https://huggingface.co`.
    pub endpoint: String,
    /// The cache folder (`models--ORG--NAME/...`): `HF_HUB_CACHE`, else
    /// `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`.
    pub cache: PathBuf,
    /// Bearer token: `HF_TOKEN`, else `HUGGING_FACE_HUB_TOKEN`, else the file `HF_TOKEN_PATH`,
    /// else `$HF_HOME/token` (what `huggingface-cli login` writes). Surrounding whitespace is
    /// dropped; an empty value counts as none.
    pub token: Option<String>,
    /// Cache only, no network: `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) is `1`/`true`/`yes`/`on`.
    pub offline: bool,
    /// `HF_HUB_DISABLE_PROGRESS_BARS` is true: callers should not draw progress.
    pub progress_disabled: bool,
    /// Longest wait for a connection or for the next bytes: `HF_HUB_DOWNLOAD_TIMEOUT` seconds
    /// (default 10, as `huggingface_hub`).
    pub timeout: Duration,
    /// HTTP(S) proxy for the endpoint: `HTTPS_PROXY`/`https_proxy` for an https endpoint,
    /// `HTTP_PROXY`/`http_proxy` for http, else `ALL_PROXY`/`all_proxy`; none when `NO_PROXY`
    /// names the endpoint's host (or is `*`).
    pub proxy: Option<String>,
}

impl std::fmt::Debug for HubSettings {
    // The token is a secret: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubSettings")
            .field("endpoint", &self.endpoint)
            .field("cache", &self.cache)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("offline", &self.offline)
            .field("progress_disabled", &self.progress_disabled)
            .field("timeout", &self.timeout)
            .field("proxy", &self.proxy)
            .finish()
    }
}

/// `huggingface_hub`'s `_is_true`.
fn is_true(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_uppercase().as_str(),
        "1" | "ON" | "YES" | "TRUE"
    )
}

impl HubSettings {
    /// The settings from the process environment.
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var_os(k))
    }

    /// The settings from `var` (a lookup of environment variables by name; an empty value
    /// counts as unset).
    pub fn from_vars(var: impl Fn(&str) -> Option<OsString>) -> Self {
        let get = |k: &str| var(k).filter(|v| !v.is_empty());
        let string = |k: &str| get(k).map(|v| v.to_string_lossy().into_owned());
        let home = || get("HOME").map(PathBuf::from);
        // `os.path.expanduser` for the leading `~` of path variables.
        let path = |k: &str| {
            get(k).map(|v| {
                let s = v.to_string_lossy().into_owned();
                match (s.strip_prefix("~/"), home()) {
                    (Some(rest), Some(h)) => h.join(rest),
                    (None, Some(h)) if s == "~" => h,
                    _ => PathBuf::from(v),
                }
            })
        };
        let hf_home = path("HF_HOME").unwrap_or_else(|| {
            path("XDG_CACHE_HOME")
                .unwrap_or_else(|| home().unwrap_or_else(|| PathBuf::from(".")).join(".cache"))
                .join("huggingface")
        });
        let cache = path("HF_HUB_CACHE")
            .or_else(|| path("HUGGINGFACE_HUB_CACHE"))
            .unwrap_or_else(|| hf_home.join("hub"));
        let clean = |t: String| Some(t.trim().to_string()).filter(|t| !t.is_empty());
        let token = string("HF_TOKEN")
            .or_else(|| string("HUGGING_FACE_HUB_TOKEN"))
            .and_then(clean)
            .or_else(|| {
                let file = path("HF_TOKEN_PATH").unwrap_or_else(|| hf_home.join("token"));
                std::fs::read_to_string(file).ok().and_then(clean)
            });
        let endpoint = string("HF_ENDPOINT")
            .map(|e| e.trim().trim_end_matches('/').to_string())
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let offline = string("HF_HUB_OFFLINE")
            .or_else(|| string("TRANSFORMERS_OFFLINE"))
            .is_some_and(|v| is_true(&v));
        let progress_disabled = string("HF_HUB_DISABLE_PROGRESS_BARS").is_some_and(|v| is_true(&v));
        let timeout = string("HF_HUB_DOWNLOAD_TIMEOUT")
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0)
            .map_or(Duration::from_secs(10), Duration::from_secs_f64);
        let proxy = proxy_for(&endpoint, &string);
        Self {
            endpoint,
            cache,
            token,
            offline,
            progress_disabled,
            timeout,
            proxy,
        }
    }
}

/// The proxy `curl`/`requests` would use for `endpoint` (see [`HubSettings::proxy`]).
fn proxy_for(endpoint: &str, string: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    let host = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest)
        .split(['/', ':'])
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    let no_proxy = string("NO_PROXY").or_else(|| string("no_proxy"));
    let excluded = no_proxy.is_some_and(|list| {
        list.split(',').map(str::trim).any(|e| {
            let e = e.trim_start_matches('.').to_ascii_lowercase();
            e == "*" || (!e.is_empty() && (host == e || host.ends_with(&format!(".{e}"))))
        })
    });
    if excluded {
        return None;
    }
    let scheme_vars: &[&str] = if endpoint.starts_with("https://") {
        &["HTTPS_PROXY", "https_proxy"]
    } else {
        &["HTTP_PROXY", "http_proxy"]
    };
    scheme_vars
        .iter()
        .chain(&["ALL_PROXY", "all_proxy"])
        .find_map(|k| string(k))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(vars: &[(&str, &str)]) -> HubSettings {
        let m: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        HubSettings::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn defaults_follow_home() {
        let s = settings(&[("HOME", "/home/u")]);
        assert_eq!(s.endpoint, DEFAULT_ENDPOINT);
        assert_eq!(s.cache, PathBuf::from("/home/u/.cache/huggingface/hub"));
        assert_eq!(s.token, None);
        assert!(!s.offline);
        assert_eq!(s.timeout, Duration::from_secs(10));
        assert_eq!(s.proxy, None);
        let s = settings(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/xdg")]);
        assert_eq!(s.cache, PathBuf::from("/xdg/huggingface/hub"));
    }

    #[test]
    fn cache_precedence() {
        let s = settings(&[("HOME", "/h"), ("HF_HOME", "~/hf")]);
        assert_eq!(s.cache, PathBuf::from("/h/hf/hub"));
        let s = settings(&[("HF_HOME", "/hf"), ("HUGGINGFACE_HUB_CACHE", "/legacy")]);
        assert_eq!(s.cache, PathBuf::from("/legacy"));
        let s = settings(&[
            ("HF_HOME", "/hf"),
            ("HUGGINGFACE_HUB_CACHE", "/legacy"),
            ("HF_HUB_CACHE", "/new"),
        ]);
        assert_eq!(s.cache, PathBuf::from("/new"));
        // Empty means unset.
        let s = settings(&[("HF_HOME", "/hf"), ("HF_HUB_CACHE", "")]);
        assert_eq!(s.cache, PathBuf::from("/hf/hub"));
    }

    #[test]
    fn endpoint_offline_and_timeout() {
        let s = settings(&[
            ("HF_ENDPOINT", "https://hf-mirror.com/"),
            ("HF_HUB_OFFLINE", "Yes"),
            ("HF_HUB_DOWNLOAD_TIMEOUT", "2.5"),
        ]);
        assert_eq!(s.endpoint, "https://hf-mirror.com");
        assert!(s.offline);
        assert_eq!(s.timeout, Duration::from_millis(2500));
        assert!(settings(&[("TRANSFORMERS_OFFLINE", "1")]).offline);
        assert!(!settings(&[("HF_HUB_OFFLINE", "0")]).offline);
        assert!(!settings(&[("HF_HUB_OFFLINE", "false")]).offline);
        assert_eq!(
            settings(&[("HF_HUB_DOWNLOAD_TIMEOUT", "x")]).timeout,
            Duration::from_secs(10)
        );
    }

    #[test]
    fn token_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().to_str().unwrap();
        // No token anywhere.
        assert_eq!(settings(&[("HF_HOME", home)]).token, None);
        // The file written by `huggingface-cli login`.
        std::fs::write(dir.path().join("token"), "hf_file\n").unwrap();
        assert_eq!(
            settings(&[("HF_HOME", home)]).token.as_deref(),
            Some("hf_file")
        );
        // HF_TOKEN_PATH points elsewhere.
        let other = dir.path().join("other");
        std::fs::write(&other, "  hf_other ").unwrap();
        assert_eq!(
            settings(&[
                ("HF_HOME", home),
                ("HF_TOKEN_PATH", other.to_str().unwrap())
            ])
            .token
            .as_deref(),
            Some("hf_other")
        );
        // The variables win over the file; HF_TOKEN over the legacy name.
        let s = settings(&[("HF_HOME", home), ("HUGGING_FACE_HUB_TOKEN", "hf_legacy")]);
        assert_eq!(s.token.as_deref(), Some("hf_legacy"));
        let s = settings(&[
            ("HF_HOME", home),
            ("HUGGING_FACE_HUB_TOKEN", "hf_legacy"),
            ("HF_TOKEN", " hf_env\n"),
        ]);
        assert_eq!(s.token.as_deref(), Some("hf_env"));
        // The token never appears in Debug output.
        assert!(!format!("{s:?}").contains("hf_env"));
    }

    #[test]
    fn proxy_choice() {
        let https = [("HTTPS_PROXY", "http://p:1"), ("HTTP_PROXY", "http://q:2")];
        assert_eq!(settings(&https).proxy.as_deref(), Some("http://p:1"));
        let mut v = https.to_vec();
        v.push(("HF_ENDPOINT", "http://127.0.0.1:9"));
        assert_eq!(settings(&v).proxy.as_deref(), Some("http://q:2"));
        v.push(("NO_PROXY", "localhost, 127.0.0.1"));
        assert_eq!(settings(&v).proxy, None);
        let s = settings(&[("ALL_PROXY", "http://a:3"), ("no_proxy", ".hf.co")]);
        assert_eq!(s.proxy.as_deref(), Some("http://a:3"));
        let s = settings(&[("ALL_PROXY", "http://a:3"), ("no_proxy", "huggingface.co")]);
        assert_eq!(s.proxy, None);
    }
}
