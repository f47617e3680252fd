//! One pass from the merged raw configuration to the [`Settings`] the agent trusts: every
//! problem found, one line each, naming its key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::bounds::{self, CountBound, DurationBound};
use super::raw::RawConfig;
use super::{Paths, Settings, Token};
use crate::agent::flakeref::FlakeRef;
use crate::agent::reboot::{Policy, Window, WindowConfig};
use crate::plumbing::secret::Secret;
use crate::plumbing::text::one_line;

/// The problems found so far. Each reader records its problem and hands back a stand-in, so that
/// the pass goes on and finds the next one.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn duration(&mut self, bound: &DurationBound, text: Option<&str>) -> Duration {
        bound.read(bound.key, text).unwrap_or_else(|e| {
            self.0.push(e);
            bound.default
        })
    }

    fn count(&mut self, bound: &CountBound, value: Option<i64>) -> u32 {
        bound.read(bound.key, value).unwrap_or_else(|e| {
            self.0.push(e);
            bound.default
        })
    }

    fn one<T>(&mut self, result: Result<T, String>) -> Option<T> {
        result.map_err(|e| self.0.push(e)).ok()
    }

    fn all<T>(&mut self, result: Result<T, Vec<String>>) -> Option<T> {
        result.map_err(|e| self.0.extend(e)).ok()
    }
}

/// Validates the merged configuration. `read_token` reads `flakehub.token_file`.
pub(crate) fn settings(
    raw: &RawConfig,
    read_token: impl Fn(&Path) -> std::io::Result<String>,
) -> Result<Settings, Vec<String>> {
    let mut p = Problems::default();
    let flake = raw
        .flake
        .as_deref()
        .and_then(|text| p.one(text.parse::<FlakeRef>().map_err(|e| format!("flake: {e}"))));
    let token = token(raw, read_token, &mut p);
    let flakehub_api_url = url(
        &mut p,
        "flakehub.api_url",
        raw.flakehub.api_url.as_deref(),
        crate::agent::flakehub::DEFAULT_API_URL,
    );
    let metadata_url = url(
        &mut p,
        "metadata.url",
        raw.metadata.url.as_deref(),
        crate::boot::metadata::client::DEFAULT_URL,
    );
    let poll_interval = p.duration(&bounds::POLL_INTERVAL, raw.poll_interval.as_deref());
    let max_backoff = p.duration(&bounds::MAX_BACKOFF, raw.max_backoff.as_deref());
    let retry_limit = p.count(&bounds::RETRY_LIMIT, raw.retry_limit);
    let apply_timeout = p.duration(&bounds::APPLY_TIMEOUT, raw.apply.timeout.as_deref());
    let confirm_timeout = p.duration(&bounds::CONFIRM_TIMEOUT, raw.confirm_timeout.as_deref());
    let min_release_age = p.duration(&bounds::MIN_RELEASE_AGE, raw.min_release_age.as_deref());
    let reboot = raw.reboot.unwrap_or_default();
    let reboot_window = window(raw.reboot_window.as_ref(), reboot, &mut p);
    let reboot_grace = p.duration(&bounds::REBOOT_GRACE, raw.reboot_grace.as_deref());
    let reboot_inhibitor_timeout = p.duration(
        &bounds::REBOOT_INHIBITOR_TIMEOUT,
        raw.reboot_inhibitor_timeout.as_deref(),
    );
    let health_checks = raw
        .health_check
        .iter()
        .enumerate()
        .filter_map(|(i, c)| p.one(crate::agent::health::Check::from_config(c, i)))
        .collect();
    let hooks = p
        .all(crate::agent::hooks::Hook::from_configs(&raw.hook))
        .unwrap_or_default();
    let metrics = match &raw.metrics {
        None => Some(crate::agent::metrics::Metrics::default()),
        Some(m) => p.all(crate::agent::metrics::Metrics::from_config(m)),
    }
    .unwrap_or_default();
    let fleet = raw.fleet.as_ref().and_then(|f| p.all(f.resolve()));
    let paths = paths(&raw.paths, &mut p);
    if !p.0.is_empty() {
        // Problems quote values (a path, a URL, a command): one line each, whatever they hold.
        return Err(p.0.iter().map(|line| one_line(line, 500)).collect());
    }
    Ok(Settings {
        flake,
        operation: raw.operation.unwrap_or_default(),
        poll_interval,
        max_backoff,
        retry_limit,
        flakehub_api_url,
        token,
        metadata_url,
        apply_mode: raw.apply.mode.unwrap_or_default(),
        apply_timeout,
        require_agent: raw.apply.require_agent.unwrap_or(true),
        confirm_timeout,
        min_release_age,
        health_checks,
        reboot,
        reboot_window,
        reboot_grace,
        reboot_inhibitor_timeout,
        hooks,
        metrics,
        fleet,
        paths,
    })
}

/// An http(s) URL, or the default.
fn url(p: &mut Problems, key: &str, text: Option<&str>, default: &str) -> String {
    let url = text.unwrap_or(default).to_string();
    if reqwest::Url::parse(&url).map_or(true, |u| !matches!(u.scheme(), "http" | "https")) {
        p.0.push(format!(
            "{key}: {} is not an http(s) URL",
            super::raw::shown(&url)
        ));
    }
    url
}

/// The window is checked whenever it is written, so that a typo shows before it matters.
fn window(config: Option<&WindowConfig>, policy: Policy, p: &mut Problems) -> Option<Window> {
    match (config, policy) {
        (Some(w), _) => p.all(w.resolve()),
        (None, Policy::Window) => p.all(WindowConfig::default().resolve()),
        (None, _) => None,
    }
}

/// `flakehub.token_file` (read here) wins over user-data's `flakehub_token`.
fn token(
    raw: &RawConfig,
    read_token: impl Fn(&Path) -> std::io::Result<String>,
    p: &mut Problems,
) -> Option<Token> {
    let Some(path) = &raw.flakehub.token_file else {
        let secret = raw.flakehub_token.as_ref()?;
        return p
            .one(token_form(secret).map_err(|e| format!("flakehub_token: {e}")))
            .map(|()| Token::UserData(secret.clone()));
    };
    let shown = path.display();
    let problem = if !path.is_absolute() {
        format!("flakehub.token_file: '{shown}' is not an absolute path")
    } else if path.starts_with("/nix/store") {
        format!(
            "flakehub.token_file: {shown} is in the Nix store, which every user can read; keep the token in a root-only file outside the store (for example /run/secrets/flakehub)"
        )
    } else {
        match read_token(path) {
            Ok(text) if !text.trim().is_empty() && !text.trim().contains(char::is_whitespace) => {
                return Some(Token::File(path.clone(), Secret::new(text.trim())));
            }
            Ok(_) => {
                format!("flakehub.token_file: {shown} does not hold a token (one word, no spaces)")
            }
            Err(e) => format!("flakehub.token_file: cannot read {shown}: {e}"),
        }
    };
    p.0.push(problem);
    None
}

/// The shortest and longest token accepted (FlakeHub's are several dozen characters long).
const MIN_TOKEN_LEN: usize = 8;
const MAX_TOKEN_LEN: usize = 4096;

/// Whether a token given as text looks like one. The message never shows the token, nor a
/// part of it.
fn token_form(secret: &Secret) -> Result<(), String> {
    const HOW: &str =
        "paste the token exactly as FlakeHub shows it (it usually starts with flakehub1_)";
    let text = secret.expose();
    if text.is_empty() {
        return Err(format!("is empty; {HOW}"));
    }
    if text.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "is {} characters long, too short for a token; {HOW}",
            text.len()
        ));
    }
    if text.len() > MAX_TOKEN_LEN {
        return Err(format!(
            "is {} characters long, more than a token has ({MAX_TOKEN_LEN}); {HOW}",
            text.len()
        ));
    }
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "contains whitespace or a control character; {HOW} (one line, no spaces)"
        ));
    }
    if !text.chars().all(|c| c.is_ascii_graphic()) {
        return Err(format!("contains non-ASCII characters; {HOW}"));
    }
    Ok(())
}

/// Every path with its default; those the agent writes or compares must be absolute.
fn paths(raw: &super::raw::PathsSection, p: &mut Problems) -> Paths {
    let d = Paths::default();
    let pick = |path: &Option<PathBuf>, default: PathBuf| path.clone().unwrap_or(default);
    let paths = Paths {
        state_dir: pick(&raw.state_dir, d.state_dir),
        run_dir: pick(&raw.run_dir, d.run_dir),
        current_system: pick(&raw.current_system, d.current_system),
        booted_system: pick(&raw.booted_system, d.booted_system),
        system_profile: pick(&raw.system_profile, d.system_profile),
        fh: pick(&raw.fh, d.fh),
        determinate_nixd: pick(&raw.determinate_nixd, d.determinate_nixd),
        nix: pick(&raw.nix, d.nix),
        nix_env: pick(&raw.nix_env, d.nix_env),
        fh_auth_file: pick(&raw.fh_auth_file, d.fh_auth_file),
        switch_lock: pick(&raw.switch_lock, d.switch_lock),
        boot_id: pick(&raw.boot_id, d.boot_id),
    };
    for (key, path) in [
        ("paths.state_dir", &paths.state_dir),
        ("paths.run_dir", &paths.run_dir),
        ("paths.current_system", &paths.current_system),
        ("paths.booted_system", &paths.booted_system),
        ("paths.system_profile", &paths.system_profile),
        ("paths.fh_auth_file", &paths.fh_auth_file),
    ] {
        if !path.is_absolute() {
            p.0.push(format!(
                "{key}: '{}' is not an absolute path",
                path.display()
            ));
        } else if path.to_string_lossy().chars().any(char::is_control) {
            p.0.push(format!(
                "{key}: '{}' contains a control character",
                path.display()
            ));
        }
    }
    paths
}
