//! Sizes, durations and endpoints as an operator writes them.
//!
//! Pure string parsers with lowercase error messages that quote the input and
//! name the accepted forms. They know nothing about keys, lines or defaults:
//! `validate` adds those. Resolving host names and binding is `transport`'s
//! job; an [`Endpoint`] is only checked for shape here.
use std::fmt;
use std::net::Ipv6Addr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Where to listen or connect: `host:port`, `[v6]:port`, `unix:/path`, or
/// (listeners only) `systemd:NAME`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `host:port` exactly as resolvable by the system (`[v6]:port` keeps its brackets).
    Tcp(String),
    Unix(PathBuf),
    /// A socket passed by systemd socket activation under this name
    /// (`FileDescriptorName=`); listeners only, `validate` enforces it.
    Systemd(String),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(a) => f.write_str(a),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Systemd(n) => write!(f, "systemd:{n}"),
        }
    }
}

const ENDPOINT_FORMS: &str = "use host:port, [ipv6]:port or unix:/path";
/// systemd's limit on a `FileDescriptorName=`.
const MAX_SYSTEMD_NAME: usize = 255;

impl Endpoint {
    /// Parses `host:port`, `1.2.3.4:port`, `[v6]:port`, `unix:path` or
    /// `systemd:NAME` (NAME as systemd allows in `FileDescriptorName=`:
    /// printable ASCII without `:`, at most 255 characters).
    ///
    /// Port 0 is accepted (a listener may ask the kernel for a port); whoever
    /// needs a real port checks [`Endpoint::port`].
    pub fn parse(s: &str) -> Result<Endpoint, String> {
        let bad = |why: &str| format!("{s:?} is not an endpoint ({why})");
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("unix: needs a path"));
            }
            if path.contains('\0') {
                return Err(bad("a path cannot contain a NUL byte"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if let Some(name) = s.strip_prefix("systemd:") {
            if name.is_empty() {
                return Err(bad("systemd: needs the socket's FileDescriptorName"));
            }
            if name.len() > MAX_SYSTEMD_NAME {
                return Err(bad("a systemd socket name is at most 255 characters"));
            }
            // What systemd accepts in LISTEN_FDNAMES.
            if !name
                .bytes()
                .all(|b| (b' '..=b'~').contains(&b) && b != b':')
            {
                return Err(bad("a systemd socket name is printable ASCII without ':'"));
            }
            return Ok(Endpoint::Systemd(name.to_owned()));
        }
        if s.contains("://") {
            return Err(bad("write host:port without a scheme"));
        }
        let port = if let Some(rest) = s.strip_prefix('[') {
            let (v6, port) = rest
                .split_once("]:")
                .ok_or_else(|| bad("an IPv6 address is written [ipv6]:port"))?;
            if v6.parse::<Ipv6Addr>().is_err() {
                return Err(bad(&format!("{v6:?} is not an IPv6 address")));
            }
            port
        } else {
            let (host, port) = s.rsplit_once(':').ok_or_else(|| bad(ENDPOINT_FORMS))?;
            if host.contains(':') {
                return Err(bad("write an IPv6 address in brackets: [ipv6]:port"));
            }
            if host.is_empty() {
                return Err(bad("the host is missing"));
            }
            let host_ok = host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
            if !host_ok {
                return Err(bad(&format!("{host:?} is not a host name or address")));
            }
            port
        };
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(&format!("{port:?} is not a port")));
        }
        if port.parse::<u16>().is_err() {
            return Err(bad("the port is above 65535"));
        }
        Ok(Endpoint::Tcp(s.to_owned()))
    }

    /// The TCP port, `None` for a Unix socket or a systemd socket.
    pub fn port(&self) -> Option<u16> {
        match self {
            Endpoint::Tcp(a) => a.rsplit_once(':').and_then(|(_, p)| p.parse().ok()),
            Endpoint::Unix(_) | Endpoint::Systemd(_) => None,
        }
    }
}

impl FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Endpoint::parse(s)
    }
}

const SIZE_UNITS: &[(&str, u64)] = &[
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("KB", 1_000),
    ("B", 1),
];

/// Splits `"64 KiB"` into `(64, "KiB")`; `None` unless it is digits then a
/// suffix (optionally one space between).
fn split_number(s: &str) -> Option<(&str, &str)> {
    let end = s
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(s.len());
    if end == 0 {
        return None;
    }
    let (digits, rest) = s.split_at(end);
    match rest.strip_prefix(' ') {
        Some("") => None,
        Some(unit) => Some((digits, unit)),
        None => Some((digits, rest)),
    }
}

/// Parses a byte size: `"512"`, `"10B"`, `"64KiB"`, `"1MiB"`, `"2GiB"`, or
/// decimal `"1KB"`/`"1MB"`/`"1GB"` (powers of 1000).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a size (use B, KiB, MiB or GiB)");
    let (digits, unit) = split_number(s).ok_or_else(bad)?;
    let scale = if unit.is_empty() {
        1
    } else {
        SIZE_UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|(_, scale)| *scale)
            .ok_or_else(bad)?
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("{s:?} is too large a size (at most {} bytes)", u64::MAX))
}

/// Parses a duration: `"1500us"`, `"250ms"`, `"30s"`, `"5m"` or `"1h"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration (use ms, s, m or h)");
    let (digits, unit) = split_number(s).ok_or_else(bad)?;
    let make: fn(u64) -> Option<Duration> = match unit {
        "us" | "µs" => |n| Some(Duration::from_micros(n)),
        "ms" => |n| Some(Duration::from_millis(n)),
        "s" => |n| Some(Duration::from_secs(n)),
        "m" => |n| n.checked_mul(60).map(Duration::from_secs),
        "h" => |n| n.checked_mul(3600).map(Duration::from_secs),
        _ => return Err(bad()),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(make)
        .ok_or_else(|| format!("{s:?} is too long a duration"))
}

/// `1 MiB`, `512 KiB`, or `1000 bytes`: a size as messages print it.
pub(crate) fn fmt_size(n: u64) -> String {
    for (name, scale) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= scale && n % scale == 0 {
            return format!("{} {name}", n / scale);
        }
    }
    format!("{n} bytes")
}

/// `30s`, `250ms`, `1500us`: a duration as messages print it.
pub(crate) fn fmt_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d.as_nanos() % 1_000_000 == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}us", d.as_micros())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        let ok = [
            ("0", 0),
            ("512", 512),
            ("10B", 10),
            ("64KiB", 64 << 10),
            ("64 KiB", 64 << 10),
            ("1MiB", 1 << 20),
            ("2GiB", 2 << 30),
            ("3KB", 3_000),
            ("5MB", 5_000_000),
            ("1GB", 1_000_000_000),
            ("18446744073709551615", u64::MAX),
            ("17179869183GiB", 17_179_869_183 << 30),
        ];
        for (s, want) in ok {
            assert_eq!(parse_size(s), Ok(want), "{s}");
        }
    }

    #[test]
    fn bad_sizes() {
        assert_eq!(
            parse_size("12 parsecs").unwrap_err(),
            r#""12 parsecs" is not a size (use B, KiB, MiB or GiB)"#
        );
        for s in [
            "", "KiB", "-1", "1.5MiB", "1kib", "1 ", "1  KiB", " 1", "1TiB", "0x10", "1KiBB",
        ] {
            assert!(
                parse_size(s).unwrap_err().contains("is not a size"),
                "{s:?}"
            );
        }
        for s in [
            "18446744073709551616",
            "17179869184GiB",
            "99999999999999999999999",
        ] {
            assert!(parse_size(s).unwrap_err().contains("too large"), "{s:?}");
        }
    }

    #[test]
    fn durations() {
        let ok = [
            ("0ms", Duration::ZERO),
            ("1500us", Duration::from_micros(1500)),
            ("250ms", Duration::from_millis(250)),
            ("30s", Duration::from_secs(30)),
            ("5m", Duration::from_secs(300)),
            ("1h", Duration::from_secs(3600)),
        ];
        for (s, want) in ok {
            assert_eq!(parse_duration(s), Ok(want), "{s}");
        }
    }

    #[test]
    fn bad_durations() {
        assert_eq!(
            parse_duration("10 fortnights").unwrap_err(),
            r#""10 fortnights" is not a duration (use ms, s, m or h)"#
        );
        for s in ["", "30", "s", "1.5s", "-1s", "1d", "1 h ", "1S", "1sec"] {
            assert!(
                parse_duration(s).unwrap_err().contains("not a duration"),
                "{s:?}"
            );
        }
        for s in ["18446744073709551615h", "99999999999999999999s"] {
            assert!(parse_duration(s).unwrap_err().contains("too long"), "{s:?}");
        }
        assert_eq!(
            parse_duration("18446744073709551615s"),
            Ok(Duration::from_secs(u64::MAX))
        );
    }

    #[test]
    fn endpoints() {
        let tcp = |s: &str| Endpoint::Tcp(s.to_owned());
        let ok = [
            ("127.0.0.1:7000", tcp("127.0.0.1:7000")),
            ("localhost:1", tcp("localhost:1")),
            ("db-1.example.com:65535", tcp("db-1.example.com:65535")),
            ("0.0.0.0:0", tcp("0.0.0.0:0")),
            ("[::1]:7000", tcp("[::1]:7000")),
            ("[fe80::1:2]:80", tcp("[fe80::1:2]:80")),
            (
                "unix:/run/orders.sock",
                Endpoint::Unix("/run/orders.sock".into()),
            ),
            (
                "unix:run/orders.sock",
                Endpoint::Unix("run/orders.sock".into()),
            ),
            ("systemd:orders", Endpoint::Systemd("orders".into())),
            (
                "systemd:orders-v6.1",
                Endpoint::Systemd("orders-v6.1".into()),
            ),
        ];
        for (s, want) in ok {
            assert_eq!(s.parse::<Endpoint>(), Ok(want.clone()), "{s}");
            assert_eq!(want.to_string(), s);
        }
        assert_eq!(tcp("[::1]:7000").port(), Some(7000));
        assert_eq!(tcp("0.0.0.0:0").port(), Some(0));
        assert_eq!(Endpoint::Unix("/x".into()).port(), None);
        assert_eq!(Endpoint::Systemd("orders".into()).port(), None);
    }

    #[test]
    fn bad_endpoints() {
        for (s, why) in [
            ("localhost", "use host:port"),
            ("", "use host:port"),
            (":7000", "host is missing"),
            ("host:", "\"\" is not a port"),
            ("host:http", "is not a port"),
            ("host:-1", "is not a port"),
            ("host:65536", "above 65535"),
            ("::1:7000", "brackets"),
            ("[::1]7000", "[ipv6]:port"),
            ("[nope]:7000", "not an IPv6 address"),
            ("a b:1", "not a host name"),
            ("unix:", "needs a path"),
            ("tcp://h:1", "without a scheme"),
            ("systemd:", "needs the socket's FileDescriptorName"),
            ("systemd:a:b", "without ':'"),
            ("systemd:a\tb", "printable ASCII"),
            ("systemd:é", "printable ASCII"),
        ] {
            let err = Endpoint::parse(s).unwrap_err();
            assert!(
                err.starts_with(&format!("{s:?} is not an endpoint (")),
                "{err}"
            );
            assert!(err.contains(why), "{s:?}: {err}");
        }
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_size(1 << 20), "1 MiB");
        assert_eq!(fmt_size(1536), "1536 bytes");
        assert_eq!(fmt_size(3 << 10), "3 KiB");
        assert_eq!(fmt_duration(Duration::from_secs(30)), "30s");
        assert_eq!(fmt_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(fmt_duration(Duration::from_micros(1500)), "1500us");
    }
}
