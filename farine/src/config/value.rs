use std::time::Duration;

/// The longest duration an option accepts, in seconds (`u32::MAX`).
const MAX_DURATION_SECONDS: f64 = u32::MAX as f64;

/// A type an option's text can be read as. `expected` completes the sentence
/// "option `x` is "..."; expected ..." in a [`super::ConfigError`].
pub trait FromValue: Sized {
    /// Parses the (trimmed) text; `None` when it is not a valid value.
    fn from_value(text: &str) -> Option<Self>;
    /// What a valid value looks like, for error messages.
    fn expected() -> &'static str;
}

impl FromValue for String {
    fn from_value(text: &str) -> Option<Self> {
        Some(text.to_string())
    }
    fn expected() -> &'static str {
        "a string"
    }
}

/// configparser's `getboolean`: `1/yes/true/on` and `0/no/false/off`, any case.
impl FromValue for bool {
    fn from_value(text: &str) -> Option<Self> {
        match text.to_ascii_lowercase().as_str() {
            "1" | "yes" | "true" | "on" => Some(true),
            "0" | "no" | "false" | "off" => Some(false),
            _ => None,
        }
    }
    fn expected() -> &'static str {
        "a boolean (true/false, yes/no, on/off, 1/0)"
    }
}

macro_rules! integers {
    ($($ty:ty => $expected:literal),* $(,)?) => {$(
        impl FromValue for $ty {
            fn from_value(text: &str) -> Option<Self> {
                text.parse().ok()
            }
            fn expected() -> &'static str {
                $expected
            }
        }
    )*};
}

integers! {
    u16 => "a whole number from 0 to 65535",
    u32 => "a whole number from 0 to 4294967295",
    u64 => "a whole number, 0 or more",
    usize => "a whole number, 0 or more",
    i64 => "a whole number",
    // For counts where 0 has no meaning (a prefetch of 0 would be no limit, 0 attempts none).
    std::num::NonZeroU16 => "a whole number from 1 to 65535",
    std::num::NonZeroU32 => "a whole number from 1 to 4294967295",
    std::num::NonZeroUsize => "a whole number, 1 or more",
}

impl FromValue for f64 {
    fn from_value(text: &str) -> Option<Self> {
        text.parse().ok().filter(|v: &f64| v.is_finite())
    }
    fn expected() -> &'static str {
        "a number"
    }
}

/// Seconds, as configparser users write them (`30`, `0.5`), or with a unit (`250ms`, `30s`, `2m`, `1h`).
impl FromValue for Duration {
    fn from_value(text: &str) -> Option<Self> {
        let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
            (n, 0.001)
        } else if let Some(n) = text.strip_suffix('s') {
            (n, 1.0)
        } else if let Some(n) = text.strip_suffix('m') {
            (n, 60.0)
        } else if let Some(n) = text.strip_suffix('h') {
            (n, 3600.0)
        } else {
            (text, 1.0)
        };
        let value: f64 = number.trim().parse().ok()?;
        let seconds = value * scale;
        // Bounded so that every duration can be added to an instant and sent to the broker
        // (a queue's message TTL is 32 bits of milliseconds): about 136 years.
        if !(0.0..=MAX_DURATION_SECONDS).contains(&seconds) {
            return None;
        }
        Duration::try_from_secs_f64(seconds).ok()
    }
    fn expected() -> &'static str {
        "a duration in seconds (`30`, `0.5`) or with a unit (`250ms`, `30s`, `2m`, `1h`), \
         at most 4294967295 seconds"
    }
}
