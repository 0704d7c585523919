//! How a commit hash is written for people: one length everywhere (the CLI,
//! mails, logs, the demo), so the same commit reads the same in each.

/// Characters of a short commit hash. Ten keep hashes unique in histories
/// far larger than any runtime's trunk (git's own default grows past seven
/// for big repositories).
pub(crate) const SHORT_LEN: usize = 10;

/// The first [`SHORT_LEN`] characters of a commit hash.
pub(crate) fn short(commit: &str) -> &str {
    commit.get(..SHORT_LEN).unwrap_or(commit)
}

#[cfg(test)]
mod tests {
    #[test]
    fn short_cuts_to_one_length_and_keeps_short_input() {
        assert_eq!(super::short(&"ab".repeat(20)), "ababababab");
        assert_eq!(super::short("abc"), "abc");
    }
}
