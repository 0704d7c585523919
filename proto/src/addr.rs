//! `host:port` addresses as hubs and agents write them: no scheme, IPv6
//! literals in brackets. One parser, so the enrollment string, the dialer and
//! the hub's config agree on what an address is.

use std::net::Ipv6Addr;

/// Splits and checks `host:port` or `[v6]:port` without resolving anything.
/// Returns the host (without brackets) and the port; the error says what is
/// wrong in words a user can act on.
pub fn split_host_port(addr: &str) -> Result<(&str, u16), &'static str> {
    if addr.contains("://") {
        return Err("give host:port without a scheme such as https://");
    }
    let (host, port) = addr.rsplit_once(':').ok_or("expected host:port")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err("the port is not a number");
    }
    let port = match port.parse::<u16>() {
        Ok(0) | Err(_) => return Err("the port must be a number between 1 and 65535"),
        Ok(p) => p,
    };
    let host = if let Some(inner) = host.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or("unbalanced `[` in an IPv6 address")?;
        inner
            .parse::<Ipv6Addr>()
            .map_err(|_| "invalid IPv6 address")?;
        inner
    } else if host.contains(':') {
        return Err("write an IPv6 address in brackets: [addr]:port");
    } else if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err("the host contains characters not allowed in a host name");
    } else {
        host
    };
    if host.is_empty() {
        return Err("the host is empty");
    }
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::split_host_port;

    #[test]
    fn good_addresses() {
        assert_eq!(
            split_host_port("hub.example.org:7443"),
            Ok(("hub.example.org", 7443))
        );
        assert_eq!(split_host_port("127.0.0.1:1"), Ok(("127.0.0.1", 1)));
        assert_eq!(split_host_port("[::1]:7443"), Ok(("::1", 7443)));
    }

    #[test]
    fn bad_addresses_say_why() {
        let cases = [
            ("https://hub:7443", "without a scheme"),
            ("hub", "expected host:port"),
            ("hub:+80", "not a number"),
            ("hub:0", "between 1 and 65535"),
            ("hub:70000", "between 1 and 65535"),
            (":7443", "host is empty"),
            ("::1:7443", "in brackets"),
            ("[::1:7443", "unbalanced"),
            ("[zz]:7443", "invalid IPv6"),
            ("hub/x:7443", "not allowed in a host name"),
        ];
        for (addr, want) in cases {
            let err = split_host_port(addr).unwrap_err();
            assert!(err.contains(want), "{addr}: {err}");
        }
    }
}
