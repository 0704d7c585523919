//! The labels a machine carries by virtue of its platform, so a job can ask
//! for `linux`, `aarch64` or exactly `linux-aarch64`. The agent announces
//! them; the hub grants exactly these (plus its token's labels) from the
//! os and arch an agent reports, whatever other labels it claims.

/// `os`, `arch` and `os-arch`, leaving out any part that is empty.
pub fn labels(os: &str, arch: &str) -> Vec<String> {
    let mut labels = Vec::with_capacity(3);
    for label in [os.to_owned(), arch.to_owned(), format!("{os}-{arch}")] {
        if !label.is_empty() && !label.starts_with('-') && !label.ends_with('-') {
            labels.push(label);
        }
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_for_a_platform() {
        assert_eq!(
            labels("linux", "x86_64"),
            ["linux", "x86_64", "linux-x86_64"]
        );
        assert_eq!(
            labels("linux", "aarch64"),
            ["linux", "aarch64", "linux-aarch64"]
        );
        assert_eq!(labels("", "aarch64"), ["aarch64"]);
        assert!(labels("", "").is_empty());
    }
}
