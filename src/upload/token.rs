//! Finds the Hetzner Cloud API token: `--token-file`, `HCLOUD_TOKEN`, or the hcloud CLI's active context.

use std::fmt;
use std::path::{Path, PathBuf};

/// An API token. Its `Debug` and `Display` never show the secret.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    /// Wraps a token after trimming surrounding white space; refuses an empty one.
    pub fn new(raw: &str, source: &str) -> anyhow::Result<Self> {
        let t = raw.trim();
        if t.is_empty() {
            anyhow::bail!(
                "the API token from {source} is empty: put a Hetzner Cloud API token there"
            );
        }
        if t.chars().any(|c| c.is_control() || c == ' ') {
            anyhow::bail!(
                "the API token from {source} contains spaces or control characters: it should be one word"
            );
        }
        Ok(Token(t.to_string()))
    }

    /// The secret itself, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
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
pub fn token_from_cli_toml(text: &str, wanted: Option<&str>) -> Result<String, String> {
    let cfg: CliConfig = toml::from_str(text)
        .map_err(|_| "it is not a valid hcloud CLI configuration (TOML)".to_string())?;
    let name = wanted
        .map(str::to_string)
        .or(cfg.active_context)
        .ok_or_else(|| "it has no active context: run `hcloud context use NAME`".to_string())?;
    let ctx = cfg
        .contexts
        .into_iter()
        .find(|c| c.name == name)
        .ok_or_else(|| format!("it has no context named '{name}'"))?;
    ctx.token
        .ok_or_else(|| format!("its context '{name}' has no token"))
}

/// Where the hcloud CLI keeps its configuration.
pub fn cli_config_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HCLOUD_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var_os("HOME")?;
    Some(Path::new(&home).join(".config/hcloud/cli.toml"))
}

/// Resolves the token: `--token-file`, else `HCLOUD_TOKEN`, else the hcloud CLI's context.
pub fn resolve(token_file: Option<&Path>) -> anyhow::Result<Token> {
    if let Some(path) = token_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read the token file {}: {e}", path.display()))?;
        warn_if_readable_by_others(path);
        return Token::new(&text, &format!("--token-file {}", path.display()));
    }
    if let Ok(t) = std::env::var("HCLOUD_TOKEN")
        && !t.trim().is_empty()
    {
        return Token::new(&t, "HCLOUD_TOKEN");
    }
    if let Some(path) = cli_config_path()
        && path.exists()
    {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        let wanted = std::env::var("HCLOUD_CONTEXT").ok();
        let token = token_from_cli_toml(&text, wanted.as_deref())
            .map_err(|e| anyhow::anyhow!("no token in {}: {e}", path.display()))?;
        return Token::new(&token, &path.display().to_string());
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
        assert_eq!(token_from_cli_toml(CLI, None).unwrap(), "tok-work");
        assert_eq!(token_from_cli_toml(CLI, Some("home")).unwrap(), "tok-home");
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
    fn token_is_redacted() {
        let t = Token::new(" abc\n", "test").unwrap();
        assert_eq!(t.expose(), "abc");
        assert!(!format!("{t:?}").contains("abc"));
        assert!(Token::new("  ", "test").is_err());
        assert!(Token::new("a b", "test").is_err());
    }
}
