//! Text from outside (the Cloud API, qemu-img, the rescue system, an image's header) made fit for one line of a message.

/// At most `max_chars` characters of `text`, trimmed, on one line: control characters (newlines,
/// escape sequences) and bidirectional overrides become spaces, and a cut is marked with `…`.
pub(crate) fn one_line(text: &str, max_chars: usize) -> String {
    let mut out = String::new();
    for (n, c) in text.trim().chars().enumerate() {
        if n == max_chars {
            out.push('…');
            break;
        }
        let hidden =
            c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        out.push(if hidden { ' ' } else { c });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_of_bounded_length() {
        assert_eq!(one_line("  a\nb\x1b[31mc\r\n", 100), "a b [31mc");
        assert_eq!(one_line("abcdef", 3), "abc…");
        assert_eq!(one_line("x\u{202e}y", 10), "x y");
        assert_eq!(one_line("", 10), "");
    }
}
