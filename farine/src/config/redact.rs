//! Keeping secrets out of logs and errors.
//!
//! Every value farine prints (in a log line, an error, `--list`) goes through [`display_value`]:
//! an option whose name says it is a secret is masked whole, and a URI keeps everything but the
//! password of its user info.

const MASK: &str = "****";

/// True for option names that hold a secret (`db_password`, `api_token`, `client_secret`, ...).
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "headers",
        "passwd",
        "secret",
        "token",
        "authorization",
        "api_key",
        "apikey",
    ]
    .iter()
    .any(|word| key.contains(word))
}

/// Replaces the password of every `scheme://user:password@host` in `text` by `****`.
///
/// `text` may hold several URIs (a cluster list, or an error message that quotes one). Users
/// write passwords raw, so a password may contain `/`, `#`, `?` or `@`: the user info is taken to
/// end at the last `@` of the URI, the URI at the first whitespace or at the `,` before the
/// next `scheme://`.
pub fn redact_uri(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(scheme_end) = rest.find("://") {
        let authority_start = scheme_end + 3;
        out.push_str(&rest[..authority_start]);
        rest = &rest[authority_start..];
        let mut uri_end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        if let Some(next_scheme) = rest[..uri_end].find("://")
            && let Some(comma) = rest[..next_scheme].rfind(',')
        {
            uri_end = comma;
        }
        let uri = &rest[..uri_end];
        match (uri.rfind('@'), uri.find(':')) {
            (Some(at), Some(colon)) if colon < at => {
                out.push_str(&uri[..colon]);
                out.push(':');
                out.push_str(MASK);
                out.push_str(&uri[at..]);
            }
            _ => out.push_str(uri),
        }
        rest = &rest[uri_end..];
    }
    out.push_str(rest);
    out
}

/// How the value of option `key` may be shown to a person.
pub fn display_value(key: &str, value: &str) -> String {
    if is_secret_key(key) {
        MASK.to_string()
    } else if key.ends_with("uri") && !value.contains("://") && value.contains('@') {
        // Not a URI farine can read (`amqp:user:pass@host`): where its user info ends is
        // unknown, so all of it before the last `@` is masked.
        let at = value.rfind('@').unwrap_or(0);
        format!("{MASK}{}", &value[at..])
    } else {
        redact_uri(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uri_without_its_slashes_keeps_nothing_before_the_at() {
        assert_eq!(
            display_value("amqp_uri", "amqp:guest:s3cret@rabbit:5672"),
            "****@rabbit:5672"
        );
    }

    #[test]
    fn a_uri_password_is_masked_and_the_rest_kept() {
        assert_eq!(
            redact_uri("amqp://guest:s3cr@t@127.0.0.1:5672/vhost"),
            "amqp://guest:****@127.0.0.1:5672/vhost"
        );
    }

    #[test]
    fn a_raw_password_with_uri_delimiters_is_masked_whole() {
        assert_eq!(
            redact_uri("amqp://guest:p#w;d/x?y@127.0.0.1:5672/"),
            "amqp://guest:****@127.0.0.1:5672/"
        );
        assert_eq!(
            redact_uri("error: amqp://u:a,b@h/v failed"),
            "error: amqp://u:****@h/v failed"
        );
    }

    #[test]
    fn a_uri_without_password_is_unchanged() {
        assert_eq!(redact_uri("amqp://guest@h/"), "amqp://guest@h/");
        assert_eq!(redact_uri("amqp://h:5672"), "amqp://h:5672");
        assert_eq!(redact_uri("no uri here"), "no uri here");
    }

    #[test]
    fn every_uri_in_a_list_or_sentence_is_masked() {
        assert_eq!(
            redact_uri("amqp://a:x@h1,amqp://b:y@h2 and amqps://c:z@h3/v"),
            "amqp://a:****@h1,amqp://b:****@h2 and amqps://c:****@h3/v"
        );
    }

    #[test]
    fn secret_options_are_masked_whole() {
        assert_eq!(display_value("db_password", "hunter2"), "****");
        assert_eq!(display_value("Auth_Token", "abc"), "****");
        assert_eq!(display_value("queue", "orders"), "orders");
    }
}
