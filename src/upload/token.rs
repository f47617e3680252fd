//! Finds the Hetzner Cloud API token: `--token-file`, `HCLOUD_TOKEN`, or the hcloud CLI's active context.

use std::path::{Path, PathBuf};

use crate::plumbing::secret::Secret;

/// Largest token file and hcloud CLI configuration read.
pub(crate) const MAX_FILE_BYTES: u64 = 1 << 20;

/// Reads a file of at most [`MAX_FILE_BYTES`] straight into a [`Secret`] (wiped once dropped).
fn read_secret_file(path: &Path) -> anyhow::Result<Secret> {
    use std::io::Read;
    let shown = path.display();
    let file =
        std::fs::File::open(path).map_err(|e| anyhow::anyhow!("cannot read {shown}: {e}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| anyhow::anyhow!("cannot read {shown}: {e}"))?;
    let len = bytes.len() as u64;
    let text = Secret::new(String::from_utf8(bytes).map_err(|e| {
        let mut b = e.into_bytes();
        b.fill(0);
        anyhow::anyhow!("cannot read {shown}: it is not UTF-8 text")
    })?);
    if len > MAX_FILE_BYTES {
        anyhow::bail!(
            "{shown} is larger than {MAX_FILE_BYTES} bytes: it is not a token or an hcloud configuration"
        );
    }
    Ok(text)
}

/// Checks a token as read from `source` (white space around it trimmed): one word, not empty.
/// Errors name the source, never the token.
pub(crate) fn parse_token(raw: &str, source: &str) -> anyhow::Result<Secret> {
    let t = raw.trim();
    if t.is_empty() {
        anyhow::bail!("the API token from {source} is empty: put a Hetzner Cloud API token there");
    }
    if t.chars().any(|c| c.is_control() || c == ' ') {
        anyhow::bail!(
            "the API token from {source} contains spaces or control characters: it should be one word"
        );
    }
    Ok(Secret::new(t))
}

#[derive(serde::Deserialize)]
struct CliConfig {
    active_context: Option<String>,
    #[serde(default)]
    contexts: Vec<CliContext>,
}

#[derive(serde::Deserialize)]
struct CliContext {
    name: String,
    token: Option<String>,
}

/// Picks the token of the context named `wanted` (else the active one) from an hcloud `cli.toml`.
/// Errors never contain the file's contents.
pub(crate) fn token_from_cli_toml(text: &str, wanted: Option<&str>) -> Result<Secret, String> {
    let cfg: CliConfig = toml::from_str(text)
        .map_err(|_| "it is not a valid hcloud CLI configuration (TOML)".to_string())?;
    let name = wanted
        .map(str::to_string)
        .or(cfg.active_context)
        .ok_or_else(|| "it has no active context: run `hcloud context use NAME`".to_string())?;
    let shown = super::outside::one_line(&name, 64);
    let ctx = cfg
        .contexts
        .into_iter()
        .find(|c| c.name == name)
        .ok_or_else(|| format!("it has no context named '{shown}'"))?;
    ctx.token
        .map(Secret::new)
        .ok_or_else(|| format!("its context '{shown}' has no token"))
}

/// Where the hcloud CLI keeps its configuration.
fn cli_config_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HCLOUD_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var_os("HOME")?;
    Some(Path::new(&home).join(".config/hcloud/cli.toml"))
}

/// Resolves the token: `--token-file`, else `HCLOUD_TOKEN`, else the hcloud CLI's context.
pub(crate) fn resolve(token_file: Option<&Path>) -> anyhow::Result<Secret> {
    if let Some(path) = token_file {
        // Read into a Secret at once, so that the file's bytes are wiped once parsed.
        let text = read_secret_file(path).map_err(|e| anyhow::anyhow!("the token file: {e}"))?;
        warn_if_readable_by_others(path);
        return parse_token(text.expose(), &format!("--token-file {}", path.display()));
    }
    if let Ok(t) = std::env::var("HCLOUD_TOKEN") {
        let t = Secret::new(t);
        if !t.expose().trim().is_empty() {
            return parse_token(t.expose(), "HCLOUD_TOKEN");
        }
    }
    if let Some(path) = cli_config_path()
        && path.exists()
    {
        let text = read_secret_file(&path)?;
        let wanted = std::env::var("HCLOUD_CONTEXT").ok();
        let token = token_from_cli_toml(text.expose(), wanted.as_deref())
            .map_err(|e| anyhow::anyhow!("no token in {}: {e}", path.display()))?;
        return parse_token(token.expose(), &path.display().to_string());
    }
    anyhow::bail!(
        "no Hetzner Cloud API token: set HCLOUD_TOKEN, pass --token-file FILE, or configure the hcloud CLI (`hcloud context create NAME`)"
    )
}

fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path)
        && m.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            "the token file {} can be read by other users: chmod 600 it",
            path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLI: &str = r#"
active_context = "work"

[[contexts]]
name = "home"
token = "tok-home"

[[contexts]]
name = "work"
token = "tok-work"
"#;

    #[test]
    fn active_context_token() {
        assert_eq!(token_from_cli_toml(CLI, None).unwrap().expose(), "tok-work");
        assert_eq!(
            token_from_cli_toml(CLI, Some("home")).unwrap().expose(),
            "tok-home"
        );
        assert!(
            token_from_cli_toml(CLI, Some("x"))
                .unwrap_err()
                .contains("'x'")
        );
    }

    #[test]
    fn errors_do_not_leak_contents() {
        let e = token_from_cli_toml("token = \"secret-abc\" [[[", None).unwrap_err();
        assert!(!e.contains("secret-abc"));
        let e = token_from_cli_toml("[[contexts]]\nname=\"a\"\ntoken=\"secret-abc\"", None)
            .unwrap_err();
        assert!(e.contains("no active context"));
    }

    #[test]
    fn files_are_read_within_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big");
        std::fs::write(&p, vec![b'a'; MAX_FILE_BYTES as usize + 1]).unwrap();
        let e = read_secret_file(&p).err().unwrap().to_string();
        assert!(e.contains("larger than"), "{e}");
        std::fs::write(&p, b"tok\xff\xfe").unwrap();
        let e = read_secret_file(&p).err().unwrap().to_string();
        assert!(e.contains("not UTF-8") && !e.contains("tok"), "{e}");
        std::fs::write(&p, b"tok").unwrap();
        assert_eq!(read_secret_file(&p).unwrap().expose(), "tok");
    }

    #[test]
    fn token_is_redacted() {
        let t = parse_token(" abc\n", "test").unwrap();
        assert_eq!(t.expose(), "abc");
        assert!(!format!("{t:?}").contains("abc"));
        assert!(parse_token("  ", "test").is_err());
        assert!(parse_token("a b", "test").is_err());
    }
}
