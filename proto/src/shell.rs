//! Quoting for a POSIX shell, so a printed command can be pasted as is (the
//! agent's enrollment hint, the hub's reproduce-it-locally commands).

/// Quotes `s` for a POSIX shell if it needs it.
pub fn quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:,@%=".contains(c));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_needs_quoting_is_quoted() {
        assert_eq!(quote("make-test_1.0"), "make-test_1.0");
        assert_eq!(quote(""), "''");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's $HOME"), r"'it'\''s $HOME'");
    }
}
