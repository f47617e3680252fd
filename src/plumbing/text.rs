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
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

/// `text` quoted for a message: `'...'`, on one line, at most 80 characters of it.
pub(crate) fn quoted(text: &str) -> String {
    format!("'{}'", one_line(text, 80))
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
}
