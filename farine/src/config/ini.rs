//! A parser for the INI dialect of Python's `configparser`.
//!
//! The `config` crate reads INI through `rust-ini`, whose rules differ from configparser's in ways
//! that bite real files: it strips inline `;`/`#` comments (a password containing `#` is cut short)
//! and treats backslashes as escapes. farine parses the file itself with configparser's rules and
//! hands the result to `config` as a [`config::Source`], so layering (environment overrides) still
//! goes through `config`.
//!
//! Rules, as in `configparser.ConfigParser()` with its defaults:
//! - `[section]` headers; section names are case-sensitive; `[DEFAULT]` is special (see `mod.rs`);
//! - `key = value` or `key : value`; the first `=` or `:` splits; keys are lower-cased
//!   (`optionxform`), key and value are trimmed;
//! - whole-line comments start with `#` or `;` (possibly indented); there are no inline comments;
//! - a line indented deeper than its option continues the value (joined with `\n`); blank lines
//!   inside such a value are kept;
//! - a duplicate section, or a duplicate option within one section, is an error (`strict=True`).

use std::collections::BTreeMap;

/// One parsed file: the sections in file order, each with its options.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IniFile {
    pub sections: BTreeMap<String, BTreeMap<String, String>>,
}

/// A syntax error, with the 1-based line it was found on.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntaxError {
    pub line: usize,
    pub message: String,
}

struct Pending {
    section: String,
    key: String,
    indent: usize,
    lines: Vec<String>,
    blank_run: usize,
}

impl Pending {
    fn value(&self) -> String {
        self.lines.join("\n")
    }
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// Parses `text` with configparser's rules.
pub fn parse(text: &str) -> Result<IniFile, SyntaxError> {
    let mut file = IniFile::default();
    let mut current: Option<String> = None;
    let mut pending: Option<Pending> = None;

    let flush = |file: &mut IniFile, pending: &mut Option<Pending>| {
        if let Some(p) = pending.take() {
            let value = p.value();
            if let Some(section) = file.sections.get_mut(&p.section) {
                section.insert(p.key, value);
            }
        }
    };

    for (index, raw) in text.lines().enumerate() {
        let line_no = index + 1;
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        let trimmed = line.trim();

        if trimmed.is_empty() {
            if let Some(p) = pending.as_mut() {
                p.blank_run += 1;
            }
            continue;
        }
        if trimmed.starts_with('#') || trimmed.starts_with(';') {
            continue;
        }

        let indent = indent_of(line);
        if let Some(p) = pending.as_mut()
            && indent > p.indent
        {
            for _ in 0..p.blank_run {
                p.lines.push(String::new());
            }
            p.blank_run = 0;
            p.lines.push(trimmed.to_string());
            continue;
        }
        flush(&mut file, &mut pending);

        if trimmed.starts_with('[') {
            let Some(name) = trimmed
                .strip_prefix('[')
                .and_then(|rest| rest.strip_suffix(']'))
            else {
                return Err(SyntaxError {
                    line: line_no,
                    message: "a section header must look like [name]".into(),
                });
            };
            if name.is_empty() {
                return Err(SyntaxError {
                    line: line_no,
                    message: "a section header needs a name: [name]".into(),
                });
            }
            if file.sections.contains_key(name) {
                return Err(SyntaxError {
                    line: line_no,
                    message: format!("section [{name}] appears twice"),
                });
            }
            file.sections.insert(name.to_string(), BTreeMap::new());
            current = Some(name.to_string());
            continue;
        }

        let Some(section) = current.clone() else {
            return Err(SyntaxError {
                line: line_no,
                message: "an option comes before any [section] header; put it under [DEFAULT] or a service section".into(),
            });
        };
        let Some(split) = trimmed.find(['=', ':']) else {
            return Err(SyntaxError {
                line: line_no,
                // The line is not echoed: it may hold a secret.
                message:
                    "expected `key = value` (or a [section], or a comment starting with # or ;)"
                        .into(),
            });
        };
        let key = trimmed[..split].trim().to_lowercase();
        let value = trimmed[split + 1..].trim().to_string();
        if key.is_empty() {
            return Err(SyntaxError {
                line: line_no,
                message: "an option needs a name before `=`".into(),
            });
        }
        if file
            .sections
            .get(&section)
            .is_some_and(|options| options.contains_key(&key))
        {
            return Err(SyntaxError {
                line: line_no,
                message: format!("option `{key}` appears twice in section [{section}]"),
            });
        }
        pending = Some(Pending {
            section,
            key,
            indent,
            lines: vec![value],
            blank_run: 0,
        });
    }
    flush(&mut file, &mut pending);
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section<'a>(file: &'a IniFile, name: &str) -> &'a BTreeMap<String, String> {
        file.sections.get(name).expect("section present")
    }

    #[test]
    fn keys_are_lowercased_and_both_delimiters_split() {
        let file = parse("[relay]\nPrefetch_Count = 5\nqueue: orders\n").unwrap();
        let relay = section(&file, "relay");
        assert_eq!(relay["prefetch_count"], "5");
        assert_eq!(relay["queue"], "orders");
    }

    #[test]
    fn section_names_keep_their_case() {
        let file = parse("[Relay]\na = 1\n").unwrap();
        assert!(file.sections.contains_key("Relay"));
        assert!(!file.sections.contains_key("relay"));
    }

    #[test]
    fn comments_are_whole_lines_only_so_values_keep_hash_and_semicolon() {
        let text = "# top\n[DEFAULT]\n  ; indented comment\namqp_uri = amqp://u:p#w;d@h/\n";
        let file = parse(text).unwrap();
        assert_eq!(section(&file, "DEFAULT")["amqp_uri"], "amqp://u:p#w;d@h/");
    }

    #[test]
    fn the_first_delimiter_splits_so_values_may_contain_more() {
        let file = parse("[s]\nuri = amqp://a:b@c:5672/v\n").unwrap();
        assert_eq!(section(&file, "s")["uri"], "amqp://a:b@c:5672/v");
    }

    #[test]
    fn indented_lines_continue_a_value_keeping_inner_blank_lines() {
        let text = "[s]\nheaders = a: 1\n  b: 2\n\n  c: 3\nnext = x\n";
        let file = parse(text).unwrap();
        assert_eq!(section(&file, "s")["headers"], "a: 1\nb: 2\n\nc: 3");
        assert_eq!(section(&file, "s")["next"], "x");
    }

    #[test]
    fn empty_values_are_allowed() {
        let file = parse("[s]\nempty =\n").unwrap();
        assert_eq!(section(&file, "s")["empty"], "");
    }

    #[test]
    fn duplicate_sections_and_options_are_errors_with_their_line() {
        let err = parse("[s]\n[s]\n").unwrap_err();
        assert_eq!(err.line, 2);
        assert!(err.message.contains("[s] appears twice"));
        let err = parse("[s]\na = 1\nA = 2\n").unwrap_err();
        assert_eq!(err.line, 3);
        assert!(err.message.contains("`a` appears twice"));
    }

    #[test]
    fn an_option_before_any_section_is_an_error() {
        let err = parse("a = 1\n").unwrap_err();
        assert_eq!(err.line, 1);
        assert!(err.message.contains("before any [section]"));
    }

    #[test]
    fn a_line_without_delimiter_is_an_error() {
        let err = parse("[s]\njust words\n").unwrap_err();
        assert_eq!(err.line, 2);
        assert!(err.message.contains("expected `key = value`"));
    }

    #[test]
    fn a_syntax_error_does_not_echo_the_line_which_may_hold_a_secret() {
        let err = parse("[s]\ndb_password hunter2\n").unwrap_err();
        assert!(!err.message.contains("hunter2"), "{}", err.message);
    }

    #[test]
    fn windows_line_endings_are_accepted() {
        let file = parse("[s]\r\na = 1\r\n").unwrap();
        assert_eq!(section(&file, "s")["a"], "1");
    }
}
