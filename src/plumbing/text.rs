//! Text from elsewhere made fit for one line of a log, a status or a message: control characters
//! escaped, length bounded.

/// `text` on one line: control characters (a newline, an escape) written as escapes (`\n`,
/// `\u{1b}`), cut to `max` characters (then `...`).
pub(crate) fn one_line(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max * 4));
    for (n, c) in text.chars().enumerate() {
        if n == max {
            out.push_str("...");
            break;
        }
        if breaks_a_line(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether `c` must not reach a line of a log or a message as it is: control characters, and
/// Unicode's line and paragraph separators (which some terminals and log viewers break on).
pub(crate) fn breaks_a_line(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')
}

/// A parser's message about a document (which quotes it) with every word that may be a token
/// replaced by its length.
pub(crate) fn without_secrets(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if word.len() > MAX_WORD {
            out.push_str(&format!("({} characters)", word.len()));
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in message.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// `text` quoted for a message: `'...'`, on one line, at most 80 characters of it.
pub(crate) fn quoted(text: &str) -> String {
    format!("'{}'", one_line(text, 80))
}

/// The longest run of letters, digits and `_` that a value quoted in a message may hold: a
/// longer one may be a token (FlakeHub's are `flakehub1_` and 30 more such characters), pasted
/// into the wrong field or mangled past recognition.
const MAX_WORD: usize = 24;

/// A value from outside for a message: [`quoted`], or by its length when it may hold a token.
pub(crate) fn shown_value(text: &str) -> String {
    if may_hold_a_secret(text) {
        format!("(a value of {} characters)", text.chars().count())
    } else {
        quoted(text)
    }
}

/// Whether `text` holds a word long enough to be a token; such a value is shown by its length.
pub(crate) fn may_hold_a_secret(text: &str) -> bool {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .any(|word| word.len() > MAX_WORD)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_length_bounded() {
        assert_eq!(
            one_line("a\nb\r\u{1b}[31m\0", 100),
            "a\\nb\\r\\u{1b}[31m\\0"
        );
        assert_eq!(one_line("ééé", 2), "éé...");
        assert_eq!(quoted("x\ny"), "'x\\ny'");
        assert_eq!(quoted(&"z".repeat(100)), format!("'{}...'", "z".repeat(80)));
    }

    #[test]
    fn line_separators_are_escaped_and_tokens_hidden() {
        assert_eq!(one_line("a\u{2028}b\u{2029}", 10), "a\\u{2028}b\\u{2029}");
        assert_eq!(
            without_secrets(
                "invalid type: string \"flakehub1_s3cr3tT0kenValue_0123456789abcdef\", expected struct"
            ),
            "invalid type: string \"(43 characters)\", expected struct"
        );
    }

    #[test]
    fn long_words_may_be_secrets() {
        assert!(may_hold_a_secret(
            "alakehub1_s3cr3tT0kenValue_0123456789abcdef"
        ));
        assert!(!may_hold_a_secret(
            "my-org/infra/0.1#nixosConfigurations.web"
        ));
        assert!(!may_hold_a_secret(
            "DeterminateSystems/hcloud-nixos-infrastructure/*"
        ));
    }
}
