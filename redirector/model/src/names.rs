//! Kubernetes node names: the one rule the node table, certificates, tokens and CSRs share.

/// Kubernetes node names are DNS subdomains (RFC 1123): lowercase alphanumerics, '-' and '.',
/// starting and ending alphanumeric, at most 253 characters.
pub fn valid_node_name(id: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !id.is_empty()
        && id.len() <= 253
        && id.chars().all(|c| alnum(c) || c == '-' || c == '.')
        && id.chars().next().is_some_and(alnum)
        && id.chars().last().is_some_and(alnum)
}

/// [`valid_node_name`], with the reason when it is not.
pub fn validate_node_id(id: &str) -> Result<(), String> {
    if valid_node_name(id) {
        return Ok(());
    }
    Err(format!(
        "{id:?} is not a valid node name (lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_follow_rfc_1123_subdomains() {
        for ok in ["a", "edge-a", "edge.a-1", "0", &"a".repeat(253)] {
            assert!(valid_node_name(ok), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "Edge",
            "a_b",
            "a b",
            "a#",
            ".a",
            &"a".repeat(254),
        ] {
            assert!(!valid_node_name(bad), "{bad}");
            assert!(
                validate_node_id(bad)
                    .unwrap_err()
                    .contains("not a valid node name")
            );
        }
    }
}
