//! The INI configuration: where it is found, how it is read, and typed access to its values.
//!
//! farine reads one INI file: the path given by `--config`, else the `FARINE_INI` environment
//! variable, else `/etc/farine.ini`. It follows Python configparser's semantics:
//! - values in `[DEFAULT]` are inherited by every section that does not set them itself;
//! - option names are case-insensitive (section names are not);
//! - `%(name)s` refers to another option of the same section (or of `[DEFAULT]`), `%%` is a `%`;
//! - each service reads the section named after it (the lower-cased struct name).
//!
//! Environment variables `FARINE__<SECTION>__<KEY>` override the file (`FARINE__DEFAULT__AMQP_URI`,
//! `FARINE__RELAY__PREFETCH_COUNT`); they are read with the `config` crate's environment source
//! and taken literally (no `%` interpolation). Keys of a handler can be scoped to it:
//! `<handler>.<key>` in the service's section wins over `<key>` (see [`Section::handler`](crate::config::Section::handler));
//! from the environment, `FARINE__<SECTION>__<HANDLER>__<KEY>`.

mod error;
pub(crate) mod ini;
pub(crate) mod keys;
pub(crate) mod redact;
mod value;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use error::{ConfigError, InvalidValue};
pub use value::FromValue;

/// Where the config file is looked for when neither `--config` nor `FARINE_INI` is given.
pub const DEFAULT_PATH: &str = "/etc/farine.ini";
/// The environment variable naming the config file.
pub const PATH_ENV: &str = "FARINE_INI";
/// The name of the section whose values every other section inherits.
pub const DEFAULT_SECTION: &str = "DEFAULT";

const ENV_PREFIX: &str = "FARINE";
const ENV_SEPARATOR: &str = "__";
const MAX_INTERPOLATION_DEPTH: usize = 10;

/// The whole configuration, after the environment overrides were applied.
#[derive(Clone)]
pub struct Config {
    file: Arc<str>,
    defaults: BTreeMap<String, String>,
    sections: BTreeMap<String, BTreeMap<String, String>>,
    /// `(section, key)` pairs whose value came from an environment variable.
    from_env: BTreeSet<(String, String)>,
}

/// The config path chosen by the rules above: `flag`, else `$FARINE_INI`, else `/etc/farine.ini`.
pub fn resolve_path(flag: Option<&Path>) -> PathBuf {
    choose_path(flag, std::env::var_os(PATH_ENV))
}

/// The flag, else the environment variable's value when set and not empty, else the default.
fn choose_path(flag: Option<&Path>, env: Option<std::ffi::OsString>) -> PathBuf {
    if let Some(path) = flag {
        return path.to_path_buf();
    }
    match env {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => PathBuf::from(DEFAULT_PATH),
    }
}

impl Config {
    /// Reads the file at `path` and applies the `FARINE__*` variables of this process.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::build(&text, &path.display().to_string(), None)
    }

    /// Parses `text` as if read from a file named `origin`, without environment overrides.
    pub fn from_ini(text: &str, origin: &str) -> Result<Self, ConfigError> {
        Self::build(text, origin, Some(BTreeMap::new()))
    }

    /// Parses `text` and applies the given `FARINE__*` variables instead of the process's.
    pub fn from_ini_with_env(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        Self::build(text, origin, Some(env.into_iter().collect()))
    }

    fn build(
        text: &str,
        origin: &str,
        env: Option<BTreeMap<String, String>>,
    ) -> Result<Self, ConfigError> {
        let mut parsed = ini::parse(text).map_err(|e| ConfigError::Syntax {
            file: origin.to_string(),
            line: e.line,
            message: e.message,
        })?;
        let mut config = Config {
            file: origin.into(),
            defaults: parsed.sections.remove(DEFAULT_SECTION).unwrap_or_default(),
            sections: parsed.sections,
            from_env: BTreeSet::new(),
        };
        for (section, key, value) in environment_overrides(env)? {
            // Environment variable names are read lower-cased: `FARINE__DEFAULT__X` means
            // [DEFAULT], and `FARINE__ORDERS__X` the file's [Orders] if it has one.
            let target = if section.eq_ignore_ascii_case(DEFAULT_SECTION) {
                DEFAULT_SECTION.to_string()
            } else {
                config
                    .sections
                    .keys()
                    .find(|name| name.eq_ignore_ascii_case(&section))
                    .cloned()
                    .unwrap_or(section)
            };
            let values = if target == DEFAULT_SECTION {
                &mut config.defaults
            } else {
                config.sections.entry(target.clone()).or_default()
            };
            values.insert(key.clone(), value);
            config.from_env.insert((target, key));
        }
        Ok(config)
    }

    /// Sets `key` of section `section` (`None`: `[DEFAULT]`) to `value`, above what the file
    /// says (the test kit points services at its broker this way).
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub(crate) fn set(&mut self, section: Option<&str>, key: &str, value: &str) {
        let values = match section {
            None => &mut self.defaults,
            Some(name) => self.sections.entry(name.to_string()).or_default(),
        };
        values.insert(key.to_string(), value.to_string());
    }

    /// The file this configuration was read from (or the origin given to [`Config::from_ini`]).
    pub fn file(&self) -> &str {
        &self.file
    }

    /// True when the file (or the environment) has a section named `name`.
    pub fn has_section(&self, name: &str) -> bool {
        self.sections.contains_key(name)
    }

    /// The names of the sections, `[DEFAULT]` excepted.
    pub fn section_names(&self) -> impl Iterator<Item = &str> {
        self.sections.keys().map(String::as_str)
    }

    /// The section `name` with `[DEFAULT]` merged under it; an error when it does not exist.
    pub fn section(&self, name: &str) -> Result<Section, ConfigError> {
        self.section_with_code(name, &[])
    }

    /// The section `name` with the settings a service's code gives its handlers
    /// (`#[execute(interval = "1s")]`, as `(handler, key, value)`): each is the handler's own
    /// default, above `[DEFAULT]` and below the section's `<key>` and `<handler>.<key>`, which
    /// override it. An error when the section does not exist.
    pub fn section_with_code(
        &self,
        name: &str,
        code: &[(&str, &str, &str)],
    ) -> Result<Section, ConfigError> {
        let own = self
            .sections
            .get(name)
            .ok_or_else(|| ConfigError::MissingSection {
                file: self.file.to_string(),
                section: name.to_string(),
            })?;
        if code.is_empty() {
            return Ok(self.merged(name, Some(own), BTreeSet::new()));
        }
        let mut own = own.clone();
        let mut from_code = BTreeSet::new();
        for (handler, key, value) in code {
            let (key, scoped) = (
                key.to_lowercase(),
                format!("{handler}.{key}").to_lowercase(),
            );
            if own.contains_key(&key) || own.contains_key(&scoped) {
                continue;
            }
            // Taken as written: no `%(name)s` interpolation in code.
            own.insert(scoped.clone(), value.replace('%', "%%"));
            from_code.insert(scoped);
        }
        Ok(self.merged(name, Some(&own), from_code))
    }

    /// The keys set in section `name` itself (`[DEFAULT]` for the defaults), not inherited.
    pub fn own_keys(&self, name: &str) -> impl Iterator<Item = &str> {
        let own = if name == DEFAULT_SECTION {
            Some(&self.defaults)
        } else {
            self.sections.get(name)
        };
        own.into_iter()
            .flat_map(|values| values.keys().map(String::as_str))
    }

    /// The names that the values of section `name` and of `[DEFAULT]` refer to with
    /// `%(name)s`: keys that are read, through the values that use them.
    pub fn referenced_keys(&self, name: &str) -> BTreeSet<String> {
        let own = self.sections.get(name).into_iter().flat_map(|v| v.values());
        self.defaults
            .values()
            .chain(own)
            .flat_map(|raw| {
                raw.split("%(")
                    .skip(1)
                    .filter_map(|tail| tail.split_once(")s").map(|(n, _)| n.to_lowercase()))
            })
            .collect()
    }

    /// The `[DEFAULT]` section alone (empty when the file has none).
    pub fn defaults(&self) -> Section {
        self.merged(DEFAULT_SECTION, None, BTreeSet::new())
    }

    /// Section `name`: its `own` values over `[DEFAULT]`'s; `from_code` names the keys a
    /// handler attribute set.
    fn merged(
        &self,
        name: &str,
        own: Option<&BTreeMap<String, String>>,
        from_code: BTreeSet<String>,
    ) -> Section {
        let mut values = self.defaults.clone();
        if let Some(own) = own {
            values.extend(own.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        // Each key set by a variable, with the variable's name (for errors).
        let from_env = values
            .keys()
            .filter_map(|key| {
                let own_has = own.is_some_and(|o| o.contains_key(key));
                let section = if own_has { name } else { DEFAULT_SECTION };
                self.from_env
                    .contains(&(section.to_string(), key.clone()))
                    .then(|| (key.clone(), variable_name(section, key)))
            })
            .collect();
        Section {
            inner: Arc::new(SectionInner {
                file: self.file.clone(),
                name: name.to_string(),
                own: own.map(|o| o.keys().cloned().collect()).unwrap_or_default(),
                values,
                from_env,
                from_code,
            }),
        }
    }
}

/// The variable that sets `key` (`relay.queue`: `FARINE__RELAY__RELAY__QUEUE`) of `section`.
fn variable_name(section: &str, key: &str) -> String {
    let mut name = format!("{ENV_PREFIX}{ENV_SEPARATOR}{}", section.to_uppercase());
    for part in key.split('.') {
        name.push_str(ENV_SEPARATOR);
        name.push_str(&part.to_uppercase());
    }
    name
}

/// The `FARINE__<SECTION>__<KEY>` variables (of the process, or `env` when given), read with the
/// `config` crate's environment source, as `(section, key, value)`, all names lower-cased. More
/// separators scope the key to a handler: `FARINE__RELAY__RELAY__QUEUE` sets `relay.queue` in
/// `[relay]`.
fn environment_overrides(
    env: Option<BTreeMap<String, String>>,
) -> Result<Vec<(String, String, String)>, ConfigError> {
    let source = config::Environment::with_prefix(ENV_PREFIX)
        .prefix_separator(ENV_SEPARATOR)
        .separator(ENV_SEPARATOR)
        .source(env.map(|vars| vars.into_iter().collect()));
    let variables = config::Source::collect(&source)
        .map_err(|e| ConfigError::Environment(redact::redact_uri(&e.to_string())))?;
    let mut overrides = Vec::new();
    for (path, value) in variables {
        let Some((section, key)) = path.split_once('.') else {
            return Err(ConfigError::Environment(format!(
                "FARINE__{}: name a section and an option, as FARINE__<SECTION>__<KEY>",
                path.to_uppercase()
            )));
        };
        let text = value
            .into_string()
            .map_err(|e| ConfigError::Environment(e.to_string()))?;
        overrides.push((section.to_string(), key.to_string(), text));
    }
    overrides.sort();
    Ok(overrides)
}

/// Values as they may be shown: secrets masked (`Debug` of [`Config`] and [`Section`]).
fn redacted(values: &BTreeMap<String, String>) -> BTreeMap<&str, String> {
    values
        .iter()
        .map(|(key, value)| (key.as_str(), redact::display_value(key, value)))
        .collect()
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sections: BTreeMap<&str, _> = self
            .sections
            .iter()
            .map(|(name, values)| (name.as_str(), redacted(values)))
            .collect();
        f.debug_struct("Config")
            .field("file", &self.file)
            .field("defaults", &redacted(&self.defaults))
            .field("sections", &sections)
            .finish()
    }
}

impl std::fmt::Debug for SectionInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Section")
            .field("file", &self.file)
            .field("name", &self.name)
            .field("values", &redacted(&self.values))
            .finish()
    }
}

/// One section of the configuration, with `[DEFAULT]` inherited. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Section {
    inner: Arc<SectionInner>,
}

struct SectionInner {
    file: Arc<str>,
    name: String,
    values: BTreeMap<String, String>,
    /// The keys set in the section itself (not inherited from `[DEFAULT]`).
    own: BTreeSet<String>,
    /// Keys set by an environment variable, with its name.
    from_env: BTreeMap<String, String>,
    /// Keys set by the service's code (a handler attribute), not by the file.
    from_code: BTreeSet<String>,
}

impl Section {
    /// The section's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The file the section was read from.
    pub fn file(&self) -> &str {
        &self.inner.file
    }

    /// True when `key` is set in this section itself, not inherited from `[DEFAULT]`.
    pub fn is_own(&self, key: &str) -> bool {
        self.inner.own.contains(&key.to_lowercase())
    }

    /// The keys set in this section or inherited from `[DEFAULT]`, lower-cased.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.inner.values.keys().map(String::as_str)
    }

    /// The value of `key` as a string, interpolated; `None` when it is not set.
    pub fn get_str(&self, key: &str) -> Result<Option<String>, ConfigError> {
        let key = key.to_lowercase();
        match self.inner.values.get(&key) {
            None => Ok(None),
            // Values from the environment are taken as they are: a URI-encoded password
            // (`%40`) must not need configparser's `%%`.
            Some(raw) if self.inner.from_env.contains_key(&key) => Ok(Some(raw.clone())),
            Some(raw) => self.interpolate(&key, raw, 0).map(Some),
        }
    }

    /// The value of `key` parsed as `T`; `None` when it is not set.
    pub fn get<T: FromValue>(&self, key: &str) -> Result<Option<T>, ConfigError> {
        let Some(text) = self.get_str(key)? else {
            return Ok(None);
        };
        T::from_value(text.trim())
            .map(Some)
            .ok_or_else(|| self.invalid(key, &text, T::expected()))
    }

    /// The value of `key` parsed as `T`, or `default` when it is not set.
    pub fn get_or<T: FromValue>(&self, key: &str, default: T) -> Result<T, ConfigError> {
        Ok(self.get(key)?.unwrap_or(default))
    }

    /// The value of `key` parsed as `T`; an error naming the key when it is not set.
    pub fn require<T: FromValue>(&self, key: &str) -> Result<T, ConfigError> {
        self.get(key)?.ok_or_else(|| ConfigError::MissingKey {
            file: self.file().to_string(),
            section: self.name().to_string(),
            key: key.to_lowercase(),
            expected: T::expected(),
        })
    }

    /// A view of this section for one handler: `<handler>.<key>` wins over `<key>`.
    pub fn handler<'a>(&'a self, handler: &'a str) -> HandlerSection<'a> {
        HandlerSection {
            section: self,
            handler,
        }
    }

    /// An error for an option whose value is not what was expected.
    pub fn invalid(&self, key: &str, value: &str, expected: impl Into<String>) -> ConfigError {
        let key = key.to_lowercase();
        let origin = if let Some(variable) = self.inner.from_env.get(&key) {
            format!(" (from environment variable {variable})")
        } else if self.inner.from_code.contains(&key) {
            " (from the handler's attribute in the code)".to_string()
        } else {
            String::new()
        };
        let shown = if self.refers_to_secret(&key) {
            "****".to_string()
        } else {
            redact::display_value(&key, value)
        };
        ConfigError::InvalidValue(Box::new(InvalidValue {
            file: self.file().to_string(),
            section: self.name().to_string(),
            value: shown,
            key,
            expected: expected.into(),
            origin,
        }))
    }

    /// True when the raw value of `key` interpolates a secret option (`%(db_password)s`).
    fn refers_to_secret(&self, key: &str) -> bool {
        let Some(raw) = self.inner.values.get(key) else {
            return false;
        };
        raw.split("%(")
            .skip(1)
            .filter_map(|tail| tail.split_once(")s").map(|(name, _)| name))
            .any(redact::is_secret_key)
    }

    fn interpolate(&self, key: &str, raw: &str, depth: usize) -> Result<String, ConfigError> {
        let fail = |message: String| ConfigError::Interpolation {
            file: self.file().to_string(),
            section: self.name().to_string(),
            key: key.to_string(),
            message,
        };
        if !raw.contains('%') {
            return Ok(raw.to_string());
        }
        if depth >= MAX_INTERPOLATION_DEPTH {
            return Err(fail(format!(
                "more than {MAX_INTERPOLATION_DEPTH} levels of %(name)s references (a loop?)"
            )));
        }
        let mut out = String::with_capacity(raw.len());
        let mut rest = raw;
        while let Some(pos) = rest.find('%') {
            out.push_str(&rest[..pos]);
            let after = &rest[pos + 1..];
            if let Some(tail) = after.strip_prefix('%') {
                out.push('%');
                rest = tail;
            } else if let Some(reference) = after.strip_prefix('(') {
                let Some(end) = reference.find(")s") else {
                    return Err(fail(
                        "a reference must look like %(name)s; write %% for a literal %".into(),
                    ));
                };
                let name = reference[..end].to_lowercase();
                let Some(value) = self.inner.values.get(&name) else {
                    return Err(fail(format!(
                        "%({name})s refers to an option that is not set in this section or [DEFAULT]"
                    )));
                };
                if self.inner.from_env.contains_key(&name) {
                    out.push_str(value);
                } else {
                    out.push_str(&self.interpolate(key, value, depth + 1)?);
                }
                rest = &reference[end + 2..];
            } else {
                return Err(fail(
                    "'%' must be followed by '%' or '(' (configparser interpolation); write %% for a literal %"
                        .into(),
                ));
            }
        }
        out.push_str(rest);
        Ok(out)
    }
}

/// A [`Section`] seen from one handler: `<handler>.<key>` is looked up before `<key>`.
#[derive(Debug, Clone, Copy)]
pub struct HandlerSection<'a> {
    section: &'a Section,
    handler: &'a str,
}

impl HandlerSection<'_> {
    fn scoped_key(&self, key: &str) -> String {
        let scoped = format!("{}.{}", self.handler, key).to_lowercase();
        if self.section.inner.values.contains_key(&scoped) {
            scoped
        } else {
            key.to_string()
        }
    }

    /// The handler's section.
    pub fn section(&self) -> &Section {
        self.section
    }

    /// The handler's name.
    pub fn handler(&self) -> &str {
        self.handler
    }

    /// The value of `<handler>.<key>` only, for keys that must not be shared between handlers.
    pub fn get_own_str(&self, key: &str) -> Result<Option<String>, ConfigError> {
        self.section
            .get_str(&format!("{}.{}", self.handler, key).to_lowercase())
    }

    /// As [`Section::get_str`], handler-scoped key first.
    pub fn get_str(&self, key: &str) -> Result<Option<String>, ConfigError> {
        self.section.get_str(&self.scoped_key(key))
    }

    /// As [`Section::get`], handler-scoped key first.
    pub fn get<T: FromValue>(&self, key: &str) -> Result<Option<T>, ConfigError> {
        self.section.get(&self.scoped_key(key))
    }

    /// As [`Section::get_or`], handler-scoped key first.
    pub fn get_or<T: FromValue>(&self, key: &str, default: T) -> Result<T, ConfigError> {
        self.section.get_or(&self.scoped_key(key), default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const SAMPLE: &str = "\
[DEFAULT]
amqp_uri = amqp://guest:guest@127.0.0.1:5672/%%2f
prefetch_count = 10

[relay]
Enabled = yes
prefetch_count = 50
relay.queue = orders-relay
drain_timeout = 2.5

[other]
";

    fn sample() -> Config {
        Config::from_ini(SAMPLE, "farine.ini").unwrap()
    }

    #[test]
    fn an_error_names_the_variable_the_value_came_from() {
        let env = [
            ("FARINE__DEFAULT__PREFETCH_COUNT", "lots"),
            ("FARINE__RELAY__WORK__INTERVAL", "soon"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let config = Config::from_ini_with_env("[relay]\n", "f.ini", env).unwrap();
        let section = config.section("relay").unwrap();
        let error = section
            .get::<u16>("prefetch_count")
            .unwrap_err()
            .to_string();
        assert!(error.contains("FARINE__DEFAULT__PREFETCH_COUNT"), "{error}");
        let error = section
            .handler("work")
            .get::<std::time::Duration>("interval")
            .unwrap_err()
            .to_string();
        assert!(error.contains("FARINE__RELAY__WORK__INTERVAL"), "{error}");
    }

    #[test]
    fn settings_from_code_sit_above_default_and_below_the_sections_own_keys() {
        let text = "[DEFAULT]\ninterval = 0\nretry_delay = 9\n\n[svc]\nprefetch_count = 5\nwork.restart = false\n";
        let config = Config::from_ini(text, "f.ini").unwrap();
        let code = [
            ("work", "interval", "1s"),
            ("work", "prefetch_count", "50"),
            ("work", "restart", "true"),
            ("work", "pct", "100%"),
        ];
        let section = config.section_with_code("svc", &code).unwrap();
        let work = section.handler("work");
        // Above [DEFAULT]:
        assert_eq!(work.get_str("interval").unwrap().as_deref(), Some("1s"));
        // Below the section's own key and the handler-scoped key:
        assert_eq!(
            work.get_str("prefetch_count").unwrap().as_deref(),
            Some("5")
        );
        assert_eq!(work.get_str("restart").unwrap().as_deref(), Some("false"));
        // Taken literally, and only for its handler:
        assert_eq!(work.get_str("pct").unwrap().as_deref(), Some("100%"));
        assert_eq!(
            section
                .handler("other")
                .get_str("interval")
                .unwrap()
                .as_deref(),
            Some("0")
        );
        assert!(config.section_with_code("nope", &code).is_err());
    }

    #[test]
    fn default_values_are_inherited_by_every_section() {
        let config = sample();
        let other = config.section("other").unwrap();
        assert_eq!(other.get::<u16>("prefetch_count").unwrap(), Some(10));
        assert_eq!(
            other.get_str("amqp_uri").unwrap().unwrap(),
            "amqp://guest:guest@127.0.0.1:5672/%2f"
        );
    }

    #[test]
    fn a_section_value_wins_over_default() {
        let relay = sample().section("relay").unwrap();
        assert_eq!(relay.get::<u16>("prefetch_count").unwrap(), Some(50));
    }

    #[test]
    fn option_names_are_case_insensitive() {
        let relay = sample().section("relay").unwrap();
        assert_eq!(relay.get::<bool>("ENABLED").unwrap(), Some(true));
        assert_eq!(relay.get::<bool>("enabled").unwrap(), Some(true));
        assert_eq!(relay.get::<u16>("Prefetch_Count").unwrap(), Some(50));
    }

    #[test]
    fn booleans_follow_configparser() {
        for (text, expected) in [
            ("1", true),
            ("yes", true),
            ("True", true),
            ("on", true),
            ("0", false),
            ("no", false),
            ("FALSE", false),
            ("off", false),
        ] {
            let config = Config::from_ini(&format!("[s]\nflag = {text}\n"), "f.ini").unwrap();
            let section = config.section("s").unwrap();
            assert_eq!(
                section.get::<bool>("flag").unwrap(),
                Some(expected),
                "{text}"
            );
        }
    }

    #[test]
    fn durations_are_seconds_or_suffixed() {
        let relay = sample().section("relay").unwrap();
        assert_eq!(
            relay.get::<Duration>("drain_timeout").unwrap(),
            Some(Duration::from_millis(2500))
        );
        let config = Config::from_ini("[s]\na = 250ms\nb = 2m\nc = 3s\n", "f.ini").unwrap();
        let s = config.section("s").unwrap();
        assert_eq!(
            s.require::<Duration>("a").unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(
            s.require::<Duration>("b").unwrap(),
            Duration::from_secs(120)
        );
        assert_eq!(s.require::<Duration>("c").unwrap(), Duration::from_secs(3));
    }

    #[test]
    fn a_missing_section_names_file_and_section() {
        let err = sample().section("ghost").unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, ConfigError::MissingSection { .. }));
        assert!(
            text.contains("farine.ini") && text.contains("[ghost]"),
            "{text}"
        );
    }

    #[test]
    fn a_missing_key_names_file_section_key_and_what_was_expected() {
        let err = sample()
            .section("other")
            .unwrap()
            .require::<String>("endpoint")
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("farine.ini")
                && text.contains("[other]")
                && text.contains("`endpoint`")
                && text.contains("expected a string"),
            "{text}"
        );
    }

    #[test]
    fn a_wrong_type_names_file_section_key_value_and_expectation() {
        let config = Config::from_ini("[relay]\nprefetch_count = lots\n", "f.ini").unwrap();
        let err = config
            .section("relay")
            .unwrap()
            .get::<u16>("prefetch_count")
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("f.ini")
                && text.contains("[relay]")
                && text.contains("`prefetch_count`")
                && text.contains("\"lots\"")
                && text.contains("a whole number from 0 to 65535"),
            "{text}"
        );
    }

    #[test]
    fn a_secret_value_never_appears_in_an_error() {
        let config = Config::from_ini(
            "[s]\namqp_uri = amqp://u:hunter2@h:99999/\ndb_password = hunter2\n",
            "f.ini",
        )
        .unwrap();
        let s = config.section("s").unwrap();
        let err = s.get::<u16>("db_password").unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
        let err = s.get::<bool>("amqp_uri").unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("amqp://u:****@h:99999/"), "{err}");
    }

    #[test]
    fn environment_overrides_the_file_and_reaches_inheriting_sections() {
        let env = [
            (
                "FARINE__DEFAULT__AMQP_URI".to_string(),
                "amqp://env/".to_string(),
            ),
            ("FARINE__RELAY__PREFETCH_COUNT".to_string(), "7".to_string()),
        ];
        let config = Config::from_ini_with_env(SAMPLE, "farine.ini", env).unwrap();
        let relay = config.section("relay").unwrap();
        assert_eq!(relay.get::<u16>("prefetch_count").unwrap(), Some(7));
        assert_eq!(relay.get_str("amqp_uri").unwrap().unwrap(), "amqp://env/");
        let other = config.section("other").unwrap();
        assert_eq!(other.get_str("amqp_uri").unwrap().unwrap(), "amqp://env/");
    }

    #[test]
    fn environment_can_add_a_section() {
        let env = [("FARINE__NEWSVC__ENABLED".to_string(), "false".to_string())];
        let config = Config::from_ini_with_env(SAMPLE, "farine.ini", env).unwrap();
        let section = config.section("newsvc").unwrap();
        assert_eq!(section.get::<bool>("enabled").unwrap(), Some(false));
    }

    #[test]
    fn a_bad_value_from_the_environment_names_the_variable() {
        let env = [(
            "FARINE__RELAY__PREFETCH_COUNT".to_string(),
            "-1".to_string(),
        )];
        let config = Config::from_ini_with_env(SAMPLE, "farine.ini", env).unwrap();
        let err = config
            .section("relay")
            .unwrap()
            .get::<u16>("prefetch_count")
            .unwrap_err()
            .to_string();
        assert!(err.contains("FARINE__RELAY__PREFETCH_COUNT"), "{err}");
    }

    #[test]
    fn environment_values_are_not_interpolated() {
        let env = [(
            "FARINE__DEFAULT__AMQP_URI".to_string(),
            "amqp://u:p%40ss@h/%2f".to_string(),
        )];
        let config = Config::from_ini_with_env(SAMPLE, "farine.ini", env).unwrap();
        let relay = config.section("relay").unwrap();
        assert_eq!(
            relay.get_str("amqp_uri").unwrap().unwrap(),
            "amqp://u:p%40ss@h/%2f"
        );
    }

    #[test]
    fn environment_names_find_a_file_section_whatever_its_case() {
        let env = [("FARINE__ORDERS__QUEUE".to_string(), "q".to_string())];
        let config = Config::from_ini_with_env("[Orders]\n", "f.ini", env).unwrap();
        assert_eq!(
            config
                .section("Orders")
                .unwrap()
                .get_str("queue")
                .unwrap()
                .unwrap(),
            "q"
        );
        assert!(!config.has_section("orders"));
    }

    #[test]
    fn more_separators_scope_an_environment_override_to_a_handler() {
        let env = [(
            "FARINE__RELAY__RELAY__QUEUE".to_string(),
            "from-env".to_string(),
        )];
        let config = Config::from_ini_with_env(SAMPLE, "farine.ini", env).unwrap();
        let relay = config.section("relay").unwrap();
        assert_eq!(
            relay.handler("relay").get_str("queue").unwrap().unwrap(),
            "from-env"
        );
    }

    #[test]
    fn a_lowercase_default_section_is_an_ordinary_section() {
        let config = Config::from_ini("[default]\na = 1\n[s]\n", "f.ini").unwrap();
        assert_eq!(config.section("s").unwrap().get_str("a").unwrap(), None);
        assert!(config.has_section("default"));
    }

    #[test]
    fn a_section_name_with_a_dot_is_taken_literally() {
        let config = Config::from_ini("[postgres.main]\na = 1\n", "f.ini").unwrap();
        assert!(config.has_section("postgres.main"));
    }

    #[test]
    fn a_value_that_interpolates_a_secret_is_masked_in_errors() {
        let text = "[s]\ndb_password = hunter2\nport = %(db_password)s\n";
        let config = Config::from_ini(text, "f.ini").unwrap();
        let err = config
            .section("s")
            .unwrap()
            .get::<u16>("port")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn interpolation_reads_the_section_and_defaults() {
        let text = "[DEFAULT]\nhost = broker\n[s]\nuri = amqp://%(host)s:%(port)s/\nport = 5672\npct = 100%%\n";
        let config = Config::from_ini(text, "f.ini").unwrap();
        let s = config.section("s").unwrap();
        assert_eq!(s.get_str("uri").unwrap().unwrap(), "amqp://broker:5672/");
        assert_eq!(s.get_str("pct").unwrap().unwrap(), "100%");
    }

    #[test]
    fn a_bad_interpolation_is_an_error_naming_the_key() {
        let config = Config::from_ini("[s]\na = 50%\nb = %(nope)s\nc = %(c)s\n", "f.ini").unwrap();
        let s = config.section("s").unwrap();
        assert!(s.get_str("a").unwrap_err().to_string().contains("`a`"));
        assert!(s.get_str("b").unwrap_err().to_string().contains("%(nope)s"));
        assert!(s.get_str("c").unwrap_err().to_string().contains("loop"));
    }

    #[test]
    fn handler_scoped_keys_win_over_section_keys() {
        let relay = sample().section("relay").unwrap();
        let scoped = relay.handler("relay");
        assert_eq!(scoped.get_str("queue").unwrap().unwrap(), "orders-relay");
        assert_eq!(scoped.get::<u16>("prefetch_count").unwrap(), Some(50));
        let other = relay.handler("other_handler");
        assert_eq!(other.get_str("queue").unwrap(), None);
    }

    #[test]
    fn a_syntax_error_names_file_and_line() {
        let err = Config::from_ini("[s]\noops\n", "bad.ini")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("bad.ini, line 2:"), "{err}");
    }

    #[test]
    fn debug_output_masks_secrets() {
        let text = "[DEFAULT]\ndb_password = hunter2\n[s]\namqp_uri = amqp://u:hunter2@h/\nheaders =\n    Authorization: Bearer hunter2\n";
        let config = Config::from_ini(text, "f.ini").unwrap();
        let shown = format!("{config:?} {:?}", config.section("s").unwrap());
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn a_missing_file_names_the_path() {
        let err = Config::load(Path::new("/nonexistent/farine.ini")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("/nonexistent/farine.ini"), "{text}");
        assert!(text.contains("FARINE_INI"), "{text}");
    }

    #[test]
    fn the_flag_wins_over_the_environment_variable_for_the_path() {
        assert_eq!(
            choose_path(Some(Path::new("/x.ini")), Some("/env.ini".into())),
            PathBuf::from("/x.ini")
        );
    }

    #[test]
    fn without_the_flag_the_environment_variable_gives_the_path_then_the_default() {
        assert_eq!(
            choose_path(None, Some("/env.ini".into())),
            PathBuf::from("/env.ini")
        );
        assert_eq!(
            choose_path(None, Some("".into())),
            PathBuf::from(DEFAULT_PATH)
        );
        assert_eq!(choose_path(None, None), PathBuf::from("/etc/farine.ini"));
    }
}
