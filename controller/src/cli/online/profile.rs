//! Saved logins: the config file (TOML, 0600, replaced atomically), `edgefleet login`,
//! `logout` and `profile list|use`, and how an online command picks its controller: `--url` and
//! `--token` (or `EDGEFLEET_URL`, `EDGEFLEET_TOKEN`) over the chosen profile.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::OutputArg;
use super::client::Client;
use crate::cli::output::{OutputFormat, Table, print_json};
use crate::fsutil;

pub const DEFAULT_PROFILE: &str = "default";
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";

/// Missing or broken configuration: the user fixes it (exit status 2), retrying will not.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "not logged in (no {missing}): run `edgefleet login --url URL` to save a profile in {}, or pass --url and --token",
        path.display()
    )]
    NotLoggedIn {
        missing: &'static str,
        path: PathBuf,
    },
    #[error(
        "no profile {name:?} in {} (saved: {known}); create it with `edgefleet login --profile {name}`",
        path.display()
    )]
    UnknownProfile {
        name: String,
        path: PathBuf,
        known: String,
    },
    #[error("cannot tell where the config file goes: set EDGEFLEET_CONFIG or HOME")]
    NoConfigDir,
    #[error("{} is not a valid edgefleet config file: {detail}", path.display())]
    Invalid { path: PathBuf, detail: String },
    #[error("{0}")]
    Usage(String),
}

/// `$EDGEFLEET_CONFIG`, else `$XDG_CONFIG_HOME/edgefleet/config.toml`, else
/// `~/.config/edgefleet/config.toml`; `var` reads the environment.
pub fn config_path_from(var: impl Fn(&str) -> Option<OsString>) -> Result<PathBuf, ConfigError> {
    let set = |name: &str| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(path) = set("EDGEFLEET_CONFIG") {
        return Ok(path);
    }
    // The XDG spec says to ignore a relative XDG_CONFIG_HOME.
    let dir = set("XDG_CONFIG_HOME")
        .filter(|dir| dir.is_absolute())
        .or_else(|| set("HOME").map(|home| home.join(".config")))
        .ok_or(ConfigError::NoConfigDir)?;
    Ok(dir.join("edgefleet").join("config.toml"))
}

pub fn config_path() -> Result<PathBuf, ConfigError> {
    config_path_from(|name| std::env::var_os(name))
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The profile used when none is named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    #[serde(default)]
    pub profiles: BTreeMap<String, Profile>,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub url: String,
    pub token: String,
}

impl std::fmt::Debug for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profile")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// The config at `path`; an empty one when the file does not exist yet.
    pub fn load(path: &Path) -> Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
        };
        toml::from_str(&text).map_err(|e| {
            ConfigError::Invalid {
                path: path.to_owned(),
                detail: e.message().to_owned(),
            }
            .into()
        })
    }

    /// Replaces the file atomically, readable by its owner only: it holds API tokens.
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fsutil::create_private_dir(dir)?;
        }
        let text = toml::to_string(self).context("cannot encode the config file")?;
        fsutil::write_atomic(path, text.as_bytes(), fsutil::SECRET_MODE)
    }

    fn profile(&self, name: &str, path: &Path) -> Result<&Profile, ConfigError> {
        self.profiles
            .get(name)
            .ok_or_else(|| ConfigError::UnknownProfile {
                name: name.to_owned(),
                path: path.to_owned(),
                known: if self.profiles.is_empty() {
                    String::from("none")
                } else {
                    self.profiles.keys().cloned().collect::<Vec<_>>().join(", ")
                },
            })
    }
}

/// The controller and token an online command uses: flags and environment first, then the named
/// or current profile.
pub fn resolve(
    profile: Option<&str>,
    url: Option<&str>,
    token: Option<&str>,
) -> Result<(String, String)> {
    if let (None, Some(url), Some(token)) = (profile, url, token) {
        return Ok((url.to_owned(), token.to_owned()));
    }
    let path = config_path()?;
    let config = Config::load(&path)?;
    let saved = match profile.or(config.current.as_deref()) {
        Some(name) => Some(config.profile(name, &path)?),
        None => None,
    };
    let missing = |missing| ConfigError::NotLoggedIn {
        missing,
        path: path.clone(),
    };
    let url = url
        .map(str::to_owned)
        .or_else(|| saved.map(|p| p.url.clone()))
        .ok_or_else(|| missing("controller URL"))?;
    let token = token
        .map(str::to_owned)
        .or_else(|| saved.map(|p| p.token.clone()))
        .ok_or_else(|| missing("API token"))?;
    Ok((url, token))
}

fn check_profile_name(name: &str) -> Result<(), ConfigError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(ConfigError::Usage(format!(
            "profile name {name:?} must be 1–64 letters, digits, '-', '_' or '.'"
        )));
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct Login {
    /// The controller's admin API.
    #[arg(long, env = "EDGEFLEET_URL", default_value = DEFAULT_URL)]
    url: String,
    /// The API token (efk_…). Without it or --token-file, the token is read from standard input.
    #[arg(long, conflicts_with = "token_file")]
    token: Option<String>,
    /// A file holding the token, e.g. the controller's `<data-dir>/admin-token`.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The name to save this login under; it becomes the current profile.
    #[arg(long, default_value = DEFAULT_PROFILE)]
    profile: String,
}

fn read_token(args: &Login) -> Result<String> {
    let token = if let Some(token) = &args.token {
        token.clone()
    } else if let Some(path) = &args.token_file {
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the token file {}", path.display()))?
    } else if std::io::stdin().is_terminal() {
        eprint!("API token (efk_…, not echoed): ");
        console::Term::stderr()
            .read_secure_line()
            .context("cannot read the token from the terminal")?
    } else {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the token from standard input")?;
        text
    };
    let token = token.trim().to_owned();
    if token.is_empty() {
        return Err(ConfigError::Usage(String::from(
            "no API token given: pass --token or --token-file, or pipe it on standard input",
        ))
        .into());
    }
    Ok(token)
}

pub fn login(args: &Login) -> Result<()> {
    check_profile_name(&args.profile)?;
    let token = read_token(args)?;
    let client = Client::new(&args.url, &token)?;
    // Any viewer-level call proves the token; the model list is small.
    client
        .get(&["models"])
        .with_context(|| format!("cannot log in to {}", client.base()))?;
    let path = config_path()?;
    let mut config = Config::load(&path)?;
    config.profiles.insert(
        args.profile.clone(),
        Profile {
            url: client.base().to_owned(),
            token,
        },
    );
    config.current = Some(args.profile.clone());
    config.save(&path)?;
    println!(
        "logged in to {}; saved as profile {:?} (the current one) in {}",
        client.base(),
        args.profile,
        path.display()
    );
    Ok(())
}

#[derive(Debug, Args)]
pub struct Logout {
    /// The profile to forget (default: the current one).
    #[arg(long, env = "EDGEFLEET_PROFILE")]
    profile: Option<String>,
}

pub fn logout(args: &Logout) -> Result<()> {
    let path = config_path()?;
    let mut config = Config::load(&path)?;
    let Some(name) = args.profile.clone().or_else(|| config.current.clone()) else {
        println!("not logged in: {} has no current profile", path.display());
        return Ok(());
    };
    config.profile(&name, &path)?;
    config.profiles.remove(&name);
    if config.current.as_deref() == Some(name.as_str()) {
        config.current = None;
    }
    config.save(&path)?;
    println!(
        "removed profile {name:?} from {}; the token itself stays valid until it is revoked (`edgefleet token revoke ID`)",
        path.display()
    );
    if config.current.is_none() && !config.profiles.is_empty() {
        println!("choose the next profile with `edgefleet profile use NAME`");
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct ProfileArgs {
    #[command(flatten)]
    output: OutputArg,
    #[command(subcommand)]
    command: ProfileCommand,
}

#[derive(Debug, Subcommand)]
pub enum ProfileCommand {
    /// List the saved profiles (their tokens are not shown).
    List,
    /// Make NAME the profile online commands use by default.
    Use { name: String },
}

pub fn profile(args: &ProfileArgs) -> Result<()> {
    let path = config_path()?;
    let mut config = Config::load(&path)?;
    match &args.command {
        ProfileCommand::List => {
            let current = config.current.as_deref();
            if args.output.output == OutputFormat::Json {
                let profiles: Vec<_> = config
                    .profiles
                    .iter()
                    .map(|(name, p)| json!({"name": name, "url": p.url, "current": current == Some(name)}))
                    .collect();
                return print_json(&json!({"config": path, "profiles": profiles}));
            }
            let mut table = Table::new(&["CURRENT", "PROFILE", "URL"]);
            for (name, p) in &config.profiles {
                let mark = if current == Some(name.as_str()) {
                    "*"
                } else {
                    ""
                };
                table.row(vec![mark.into(), name.clone(), p.url.clone()]);
            }
            table.print_or(&format!(
                "no profiles in {}; run `edgefleet login`",
                path.display()
            ))?;
        }
        ProfileCommand::Use { name } => {
            config.profile(name, &path)?;
            config.current = Some(name.clone());
            config.save(&path)?;
            println!("now using profile {name:?} ({})", config.profiles[name].url);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn env<'a>(vars: &'a [(&str, &str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn the_config_file_is_found_as_documented() {
        let path = |vars: &[(&str, &str)]| config_path_from(env(vars)).ok();
        assert_eq!(
            path(&[("EDGEFLEET_CONFIG", "/c.toml"), ("HOME", "/h")]),
            Some(PathBuf::from("/c.toml"))
        );
        assert_eq!(
            path(&[("XDG_CONFIG_HOME", "/x"), ("HOME", "/h")]),
            Some(PathBuf::from("/x/edgefleet/config.toml"))
        );
        assert_eq!(
            path(&[("XDG_CONFIG_HOME", "rel"), ("HOME", "/h")]),
            Some(PathBuf::from("/h/.config/edgefleet/config.toml"))
        );
        assert_eq!(path(&[("EDGEFLEET_CONFIG", "")]), None);
    }

    #[test]
    fn configs_round_trip_privately_and_refuse_unknown_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("config.toml");
        assert!(Config::load(&path).unwrap().profiles.is_empty());
        let mut config = Config::default();
        config.profiles.insert(
            "prod".into(),
            Profile {
                url: "https://ctl.example".into(),
                token: "efk_secret".into(),
            },
        );
        config.current = Some("prod".into());
        config.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let loaded = Config::load(&path).unwrap();
        assert_eq!(loaded.current.as_deref(), Some("prod"));
        assert_eq!(loaded.profiles["prod"].token, "efk_secret");
        assert!(!format!("{loaded:?}").contains("efk_secret"));

        std::fs::write(&path, "curent = \"prod\"\n").unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("not a valid edgefleet config file"), "{err}");
        let missing = loaded.profile("staging", &path).unwrap_err().to_string();
        assert!(missing.contains("saved: prod"), "{missing}");
    }
}
