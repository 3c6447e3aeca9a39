//! Identifiers unique to this process: a random prefix and a counter (`<prefix>-<n>`), as
//! message ids and RPC correlation ids are made.

/// 16 hex digits, different in every process (and on every call).
pub(crate) fn random_prefix() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    format!("{:016x}", hasher.finish())
}

/// `<prefix>-<n>`, written by hand: it is made for every message and every call, and `format!`
/// costs a few hundred instructions more.
pub(crate) fn numbered(prefix: &str, mut n: u64) -> String {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut id = String::with_capacity(prefix.len() + 1 + digits.len() - start);
    id.push_str(prefix);
    id.push('-');
    id.extend(digits[start..].iter().map(|&d| char::from(d)));
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_numbered_id_is_the_prefix_a_dash_and_the_number_in_decimal() {
        assert_eq!(numbered("ab", 0), "ab-0");
        assert_eq!(numbered("ab", 1234567890), "ab-1234567890");
        assert_eq!(numbered("", u64::MAX), format!("-{}", u64::MAX));
    }

    #[test]
    fn each_prefix_is_sixteen_hex_digits_and_differs_from_the_last() {
        let (a, b) = (random_prefix(), random_prefix());
        assert!(
            a.len() == 16 && a.chars().all(|c| c.is_ascii_hexdigit()),
            "{a}"
        );
        assert_ne!(a, b);
    }
}
