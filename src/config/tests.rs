//! The config suite: whole files through [`parse`], valid and invalid.
//! Unit parsers are tested beside their code in `units.rs`.
use std::time::Duration;

use proptest::prelude::*;

use super::*;

/// The smallest valid file.
const MINIMAL: &str = r#"
[[listener]]
name = "orders"
listen = "127.0.0.1:7000"
backend = "orders"

[[backend]]
name = "orders"
servers = ["127.0.0.1:7001"]
"#;

/// `MINIMAL` with `extra` lines appended to the backend table.
fn backend_with(extra: &str) -> String {
    format!("{MINIMAL}{extra}\n")
}

/// Every error as displayed.
fn errors(src: &str) -> Vec<String> {
    match parse(src) {
        Ok(c) => panic!("expected errors, parsed {c:#?}"),
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

/// The one error a file has.
fn error(src: &str) -> String {
    let errs = errors(src);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    errs.into_iter().next().unwrap_or_default()
}

fn ok(src: &str) -> Config {
    parse(src).unwrap_or_else(|e| panic!("{e}"))
}

const DEFAULT_SOCKET: SocketOptions = SocketOptions {
    nodelay: true,
    keepalive: Some(Keepalive {
        idle: Duration::from_secs(60),
        interval: Duration::from_secs(10),
        count: 6,
    }),
    user_timeout: None,
};

#[test]
fn minimal_file_gets_every_default() {
    let want = Config {
        admin: None,
        limits: Limits {
            buffer_memory: 256 << 20,
            max_sessions: 10_000,
            fd_reserve: 64,
        },
        lifecycle: Lifecycle {
            drain_timeout: Duration::from_secs(30),
        },
        runtime: RuntimeConfig {
            worker_threads: None,
            scheduler: Scheduler::PerThread,
        },
        log: LogConfig { access: None },
        handover: None,
        failover: None,
        listeners: vec![ListenerConfig {
            name: "orders".into(),
            listen: Endpoint::Tcp("127.0.0.1:7000".into()),
            backend: 0,
            protocol: ListenerProtocol::Tcp,
            socket: DEFAULT_SOCKET,
            tls: None,
            sni: vec![],
            max_sessions: None,
            max_sessions_per_client: None,
            idle_timeout: None,
        }],
        backends: vec![BackendConfig {
            name: "orders".into(),
            servers: vec![Endpoint::Tcp("127.0.0.1:7001".into())],
            protocol: BackendProtocol::Tcp,
            ack: AckMode::Tcp,
            buffer_limit: 1 << 20,
            hold_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(1),
            retry_initial: Duration::from_millis(1),
            retry_max: Duration::from_millis(200),
            on_server_close: OnServerClose::Reconnect,
            greeting: 0,
            preamble: 0,
            retry_responses: vec![],
            max_held_sessions: None,
            splice: false,
            socket: SocketOptions {
                user_timeout: Some(Duration::from_secs(30)),
                ..DEFAULT_SOCKET
            },
            tls: None,
        }],
    };
    assert_eq!(ok(MINIMAL), want);
}

#[test]
fn every_key_set() {
    let c = ok(r#"
[admin]
listen = "[::1]:9900"
[limits]
buffer_memory = 1048576
max_sessions = 5
[lifecycle]
drain_timeout = "250ms"
[runtime]
worker_threads = 3
scheduler = "work-stealing"

[[listener]]
name = "b-listener"
listen = "unix:/run/a.sock"
backend = "second"
protocol = "tcp"
nodelay = false
keepalive = false
user_timeout = "5s"

[[backend]]
name = "first"
servers = ["h:1"]
ack = "none"

[[backend]]
name = "second"
servers = ["127.0.0.1:7001", "unix:srv.sock", "[::1]:7002"]
protocol = "tcp"
ack = "response"
framing = { type = "length-prefixed", length_field_offset = 2, length_field_length = 2, big_endian = false, length_adjustment = -2 }
max_frame = "64KiB"
buffer_limit = "4KiB"
hold_timeout = "1m"
connect_timeout = "100ms"
retry_initial = "5ms"
retry_max = "5ms"
on_server_close = "close"
greeting = 1
preamble = 2
retry_responses = ["-BUSY", "ERR later"]
keepalive_idle = "1s"
keepalive_interval = "2s"
keepalive_count = 127
user_timeout = "0s"
"#);
    assert_eq!(
        c.admin,
        Some(AdminConfig {
            listen: Endpoint::Tcp("[::1]:9900".into())
        })
    );
    assert_eq!(c.limits.buffer_memory, 1 << 20);
    assert_eq!(c.limits.max_sessions, 5);
    assert_eq!(c.lifecycle.drain_timeout, Duration::from_millis(250));
    assert_eq!(c.runtime.worker_threads, Some(3));
    assert_eq!(c.runtime.scheduler, Scheduler::WorkStealing);
    let l = &c.listeners[0];
    assert_eq!(l.backend, 1);
    assert_eq!(c.backend_of(l).name, "second");
    assert_eq!(l.listen, Endpoint::Unix("/run/a.sock".into()));
    assert_eq!(
        l.socket,
        SocketOptions {
            nodelay: false,
            keepalive: None,
            user_timeout: Some(Duration::from_secs(5)),
        }
    );
    assert_eq!(c.backends[0].ack, AckMode::None);
    let b = &c.backends[1];
    assert_eq!(b.servers.len(), 3);
    assert_eq!(
        b.ack,
        AckMode::Response(Framing::LengthPrefixed(LengthPrefixed {
            length_field_offset: 2,
            length_field_length: 2,
            big_endian: false,
            length_adjustment: -2,
            max_frame: 64 << 10,
        }))
    );
    assert_eq!(b.buffer_limit, 4096);
    assert_eq!(b.hold_timeout, Duration::from_secs(60));
    assert_eq!(b.connect_timeout, Duration::from_millis(100));
    assert_eq!(b.retry_initial, b.retry_max);
    assert_eq!(b.on_server_close, OnServerClose::Close);
    assert_eq!((b.greeting, b.preamble), (1, 2));
    assert_eq!(
        b.retry_responses,
        vec![b"-BUSY".to_vec(), b"ERR later".to_vec()]
    );
    assert_eq!(
        b.socket,
        SocketOptions {
            nodelay: true,
            keepalive: Some(Keepalive {
                idle: Duration::from_secs(1),
                interval: Duration::from_secs(2),
                count: 127,
            }),
            user_timeout: None,
        }
    );
}

#[test]
fn framing_forms_and_max_frame_defaults() {
    let framing = |extra: &str| match ok(&backend_with(extra)).backends[0].ack.clone() {
        AckMode::Response(f) => f,
        other => panic!("{other:?}"),
    };
    let lines = "ack = \"response\"\nframing = \"lines\"";
    assert_eq!(
        framing(lines),
        Framing::Lines {
            max_frame: 64 << 10
        }
    );
    let table = "ack = \"response\"\nframing = { type = \"resp\" }\nmax_frame = 100";
    assert_eq!(framing(table), Framing::Resp { max_frame: 100 });
    let lp = "ack = \"response\"\nframing = \"length-prefixed\"";
    assert_eq!(
        framing(lp),
        Framing::LengthPrefixed(LengthPrefixed {
            length_field_offset: 0,
            length_field_length: 4,
            big_endian: true,
            length_adjustment: 0,
            max_frame: 8 << 20,
        })
    );
}

#[test]
fn resp_retries_loading_by_default() {
    let c = ok(&backend_with("ack = \"response\"\nframing = \"resp\""));
    assert_eq!(c.backends[0].retry_responses, vec![b"-LOADING".to_vec()]);
    let c = ok(&backend_with(
        "ack = \"response\"\nframing = \"resp\"\nretry_responses = []",
    ));
    assert!(c.backends[0].retry_responses.is_empty());
    let c = ok(&backend_with("ack = \"response\"\nframing = \"lines\""));
    assert!(c.backends[0].retry_responses.is_empty());
}

#[test]
fn three_errors_at_once_with_positions() {
    let src = r#"[[listener]]
name = "orders"
listen = "127.0.0.1:7000"
backend = "ordrs"

[[backend]]
name = "orders"
servers = ["127.0.0.1:7001"]
buffer_limit = "12 parsecs"
colour = "red"
"#;
    assert_eq!(
        errors(src),
        [
            r#"listener[0].backend (line 4, col 11): no backend named "ordrs" (backends: orders)"#,
            r#"backend[0].buffer_limit (line 9, col 16): "12 parsecs" is not a size (use B, KiB, MiB or GiB)"#,
            r#"backend[0].colour (line 10, col 1): unknown key "colour""#,
        ]
    );
}

#[test]
fn columns_count_characters_not_bytes() {
    let src = backend_with("greeting = 1 # é\nhold_timeout = \"0s\"");
    let src = src.replace(
        "name = \"orders\"\nservers",
        "name = \"orders\" # ünïcödé\nservers",
    );
    let err = &errors(&src);
    assert!(err.iter().any(|e| e.contains("greeting (line")), "{err:#?}");
    let errs = errors("listener = [{ \"é\" = 1, \"ü\" = 2 }]");
    for want in [
        r#"listener[0].é (line 1, col 15): unknown key "é""#,
        r#"listener[0].ü (line 1, col 24): unknown key "ü""#,
    ] {
        assert!(errs.contains(&want.to_owned()), "{errs:#?}");
    }
    let errs = errors("[[listener]]\nname = \"ü\" ; listen = 1");
    assert!(
        errs[0].starts_with("toml (line 2, col 12): syntax error:"),
        "{errs:#?}"
    );
}

#[test]
fn unknown_keys_everywhere() {
    let src = r#"
colour = 1
[admin]
listen = "127.0.0.1:1"
port = 2
[limits]
buffer_memroy = "1MiB"
[lifecycle]
drain = "1s"
[[listener]]
name = "a"
listen = "127.0.0.1:7000"
backend = "b"
tls_cert = "c"
[[backend]]
name = "b"
servers = ["h:1"]
ack = "response"
framing = { type = "lines", big_endian = true }
[extra]
"#;
    let keys: Vec<String> = match parse(src) {
        Err(e) => {
            e.0.into_iter()
                .map(|e| format!("{} {}", e.key, e.line))
                .collect()
        }
        Ok(_) => panic!(),
    };
    assert_eq!(
        keys,
        [
            "colour 2",
            "admin.port 5",
            "limits.buffer_memroy 7",
            "lifecycle.drain 9",
            "listener[0].tls_cert 14",
            "backend[0].framing.big_endian 19",
            "extra 20",
        ]
    );
}

#[test]
fn wrong_toml_types() {
    for (extra, want) in [
        ("buffer_limit = true", "backend[0].buffer_limit (line 10, col 16): expected a size like \"64KiB\" or a number of bytes, found a boolean"),
        ("hold_timeout = 30", "backend[0].hold_timeout (line 10, col 16): 30 needs a unit: write a string like \"30s\" or \"30ms\""),
        ("connect_timeout = 1.5", "backend[0].connect_timeout (line 10, col 19): expected a duration like \"30s\", found a float"),
        ("greeting = \"1\"", "backend[0].greeting (line 10, col 12): expected an integer, found a string"),
        ("nodelay = \"yes\"", "backend[0].nodelay (line 10, col 11): expected a boolean (true or false), found a string"),
        ("protocol = [\"tcp\"]", "backend[0].protocol (line 10, col 12): expected a string, found an array"),
        ("retry_responses = \"-ERR\"", "backend[0].retry_responses (line 10, col 19): expected an array of strings, found a string"),
        ("user_timeout = 1979-05-27", "backend[0].user_timeout (line 10, col 16): expected a duration like \"30s\", found a datetime"),
        ("ack = \"response\"\nframing = 4", "backend[0].framing (line 11, col 11): expected a framing name (lines, length-prefixed or resp) or a table, found an integer"),
        ("buffer_limit = -1", "backend[0].buffer_limit (line 10, col 16): -1 is not a size (it is negative)"),
    ] {
        assert_eq!(error(&backend_with(extra)), want, "{extra}");
    }
    let errs = errors(&MINIMAL.replace(r#"["127.0.0.1:7001"]"#, r#"["h:1", 2, "h:3"]"#));
    assert_eq!(
        errs,
        ["backend[0].servers[1] (line 9, col 19): expected a string, found an integer"]
    );
    let errs = errors("listener = 1\n[[backend]]\nname = \"x\"\nservers = [\"h:1\"]");
    assert_eq!(
        errs,
        [
            "listener (line 1, col 12): expected an array of tables ([[listener]]), found an integer",
            "listener: at least one [[listener]] is required",
        ]
    );
    assert_eq!(
        errors("limits = 3\n"),
        [
            "limits (line 1, col 10): expected a table, found an integer",
            "listener: at least one [[listener]] is required",
        ]
    );
}

#[test]
fn bad_values() {
    for (extra, key, message) in [
        ("protocol = \"udp\"", "backend[0].protocol", "unknown protocol \"udp\" (use tcp or resume)"),
        ("protocol = \"resume\"", "backend[0].resume", "protocol = \"resume\" needs resume = { secret_file = \"...\" }"),
        ("ack = \"always\"", "backend[0].ack", "unknown ack mode \"always\" (use none, tcp, response or resume)"),
        ("on_server_close = \"panic\"", "backend[0].on_server_close", "unknown on_server_close \"panic\" (use reconnect or close)"),
        ("ack = \"response\"\nframing = \"json\"", "backend[0].framing", "unknown framing \"json\" (use lines, length-prefixed or resp)"),
        ("ack = \"response\"\nframing = { length_field_length = 2 }", "backend[0].framing.type", "missing key \"type\" (lines, length-prefixed or resp)"),
        ("hold_timeout = \"10 fortnights\"", "backend[0].hold_timeout", "\"10 fortnights\" is not a duration (use ms, s, m or h)"),
        ("hold_timeout = \"0s\"", "backend[0].hold_timeout", "\"0s\" is 0; it must be more"),
        ("connect_timeout = \"0ms\"", "backend[0].connect_timeout", "\"0ms\" is 0; it must be more"),
        ("retry_initial = \"1s\"", "backend[0].retry_initial", "retry_initial (1s) is longer than retry_max (200ms)"),
        ("retry_max = \"500us\"", "backend[0].retry_max", "retry_initial (1ms) is longer than retry_max (500us)"),
        ("buffer_limit = \"1023B\"", "backend[0].buffer_limit", "1023 bytes is below the minimum of 1 KiB"),
        ("buffer_limit = \"512MiB\"", "backend[0].buffer_limit", "512 MiB is more than limits.buffer_memory (256 MiB)"),
        ("keepalive_count = 0", "backend[0].keepalive_count", "0 is out of range (1 to 127)"),
        ("keepalive_count = 128", "backend[0].keepalive_count", "128 is out of range (1 to 127)"),
        ("keepalive_idle = \"1500ms\"", "backend[0].keepalive_idle", "1500ms is not a whole number of seconds from 1s to 32767s"),
        ("keepalive_interval = \"0s\"", "backend[0].keepalive_interval", "0s is not a whole number of seconds from 1s to 32767s"),
        ("keepalive = false\nkeepalive_count = 3", "backend[0].keepalive_count", "keepalive_count has no effect with keepalive = false"),
        ("user_timeout = \"50d\"", "backend[0].user_timeout", "\"50d\" is not a duration (use ms, s, m or h)"),
        ("user_timeout = \"1200h\"", "backend[0].user_timeout", "4320000s is longer than 49 days"),
        ("servers = []", "backend[0].servers", "is empty; a backend needs at least one server"),
        ("servers = [\"127.0.0.1:0\"]", "backend[0].servers[0]", "\"127.0.0.1:0\" has port 0; a server needs a real port"),
        ("servers = [\"db\"]", "backend[0].servers[0]", "\"db\" is not an endpoint (use host:port, [ipv6]:port or unix:/path)"),
        ("ack = \"response\"", "backend[0].ack", "ack = \"response\" needs a framing key (lines, length-prefixed or resp)"),
        ("framing = \"lines\"", "backend[0].framing", "framing only applies with ack = \"response\" (ack is \"tcp\")"),
        ("ack = \"none\"\nframing = \"lines\"", "backend[0].framing", "framing only applies with ack = \"response\" (ack is \"none\")"),
        ("max_frame = \"1MiB\"", "backend[0].max_frame", "max_frame only applies with a framing"),
        ("greeting = 1", "backend[0].greeting", "greeting only applies with ack = \"response\" (ack is \"tcp\")"),
        ("preamble = 0", "backend[0].preamble", "preamble only applies with ack = \"response\" (ack is \"tcp\")"),
        ("retry_responses = []", "backend[0].retry_responses", "retry_responses only applies with ack = \"response\" (ack is \"tcp\")"),
        ("ack = \"response\"\nframing = \"lines\"\ngreeting = -1", "backend[0].greeting", "-1 is out of range (0 to 4294967295)"),
        ("ack = \"response\"\nframing = \"lines\"\nretry_responses = [\"\"]", "backend[0].retry_responses[0]", "an empty prefix would match every response"),
        ("ack = \"response\"\nframing = \"lines\"\nmax_frame = 0", "backend[0].max_frame", "0 is 0 bytes; it must be more"),
        ("ack = \"response\"\nframing = { type = \"length-prefixed\", length_field_length = 3 }", "backend[0].framing.length_field_length", "3 is not a length field width (use 1, 2, 4 or 8)"),
        ("ack = \"response\"\nframing = { type = \"length-prefixed\", length_field_length = 16 }", "backend[0].framing.length_field_length", "16 is not a length field width (use 1, 2, 4 or 8)"),
        ("ack = \"response\"\nframing = { type = \"length-prefixed\", length_field_offset = -1 }", "backend[0].framing.length_field_offset", "-1 is out of range (0 to 4294967295)"),
        ("ack = \"response\"\nframing = { type = \"length-prefixed\", length_field_offset = 2 }\nmax_frame = 6", "backend[0].max_frame", "6 bytes cannot hold the 6 byte header (length_field_offset + length_field_length)"),
        ("ack = \"response\"\nframing = { type = \"lines\", length_field_length = 2 }", "backend[0].framing.length_field_length", "unknown key \"length_field_length\""),
    ] {
        let src = if extra.starts_with("servers") {
            MINIMAL.replace(r#"servers = ["127.0.0.1:7001"]"#, extra)
        } else {
            backend_with(extra)
        };
        let errs = errors(&src);
        assert_eq!(errs.len(), 1, "{extra}: {errs:#?}");
        let (head, msg) = errs[0].split_once(": ").unwrap_or_default();
        assert!(head.starts_with(&format!("{key} (line ")), "{extra}: {}", errs[0]);
        assert_eq!(msg, message, "{extra}");
    }
}

#[test]
fn limits_and_admin() {
    assert_eq!(
        error(&format!("[limits]\nmax_sessions = 0\n{MINIMAL}")),
        "limits.max_sessions (line 2, col 16): 0 is out of range (1 to 4294967295)"
    );
    assert_eq!(
        error(&format!("[limits]\nbuffer_memory = \"0B\"\n{MINIMAL}")),
        "limits.buffer_memory (line 2, col 17): \"0B\" is 0 bytes; it must be more"
    );
    assert_eq!(
        error(&format!("[limits]\nbuffer_memory = \"512KiB\"\n{MINIMAL}")),
        "backend[0].buffer_limit (line 9, col 1): 1 MiB is more than limits.buffer_memory (512 KiB)"
    );
    assert_eq!(
        error(&format!("[lifecycle]\ndrain_timeout = \"soon\"\n{MINIMAL}")),
        "lifecycle.drain_timeout (line 2, col 17): \"soon\" is not a duration (use ms, s, m or h)"
    );
    assert_eq!(
        error(&backend_with("ack = \"tcp\"\nsplice = true")),
        "backend[0].splice (line 11, col 10): applies only to ack = \"none\" (the other modes keep the bytes for replay)"
    );
    assert!(ok(&backend_with("ack = \"none\"")).backends[0].splice);
    assert!(!ok(&backend_with("ack = \"none\"\nsplice = false")).backends[0].splice);
    assert!(!ok(&backend_with("ack = \"tcp\"\nsplice = false")).backends[0].splice);
    assert!(!ok(&backend_with("ack = \"tcp\"")).backends[0].splice);
    assert_eq!(
        error(&format!("[runtime]\nworker_threads = 0\n{MINIMAL}")),
        "runtime.worker_threads (line 2, col 18): 0 is out of range (1 to 1024)"
    );
    assert_eq!(
        error(&format!("[runtime]\nworker_threads = \"2\"\n{MINIMAL}")),
        "runtime.worker_threads (line 2, col 18): expected an integer, found a string"
    );
    assert_eq!(
        error(&format!("[runtime]\nscheduler = \"stealing\"\n{MINIMAL}")),
        "runtime.scheduler (line 2, col 13): unknown scheduler \"stealing\" (use per-thread or work-stealing)"
    );
    assert_eq!(
        error(&format!("[admin]\nlisten = \"unix:/a\"\n{MINIMAL}")),
        "admin.listen (line 2, col 10): the admin endpoint is tcp only (use host:port)"
    );
    assert_eq!(
        error(&format!("[admin]\n{MINIMAL}")),
        "admin.listen (line 1, col 1): missing key \"listen\""
    );
    // A bad buffer_memory does not also fail every buffer_limit against a default.
    assert_eq!(
        errors(&format!(
            "[limits]\nbuffer_memory = \"lots\"\n{}",
            backend_with("buffer_limit = \"1GiB\"")
        ))
        .len(),
        1
    );
}

#[test]
fn listener_rules() {
    let two = r#"
[[listener]]
name = "a"
listen = "127.0.0.1:7000"
backend = "b"
[[listener]]
name = "a"
listen = "127.0.0.1:7000"
backend = "b"
[[backend]]
name = "b"
servers = ["h:1"]
"#;
    assert_eq!(
        errors(two),
        [
            r#"listener[1].name (line 7, col 8): duplicate listener name "a" (also listener[0], line 3)"#,
            r#"listener[1].listen (line 8, col 10): "127.0.0.1:7000" is already the listen address of listener[0] (line 4)"#,
        ]
    );
    // Port 0 twice is two different kernel-chosen ports.
    let c = ok(&two
        .replace("7000", "0")
        .replacen("name = \"a\"", "name = \"c\"", 1));
    assert_eq!(c.listeners.len(), 2);
    let dup_backend = format!("{MINIMAL}[[backend]]\nname = \"orders\"\nservers = [\"h:2\"]\n");
    assert_eq!(
        error(&dup_backend),
        r#"backend[1].name (line 11, col 8): duplicate backend name "orders" (also backend[0], line 8)"#
    );
    assert_eq!(
        errors("[[listener]]\nname = \"a b\"\nlisten = \"h\"\nbackend = \"x\"\nprotocol = \"resume\"\nbogus = 1"),
        [
            r#"listener[0].resume (line 1, col 1): protocol = "resume" needs resume = { secret_file = "..." }"#,
            r#"listener[0].name (line 2, col 8): "a b" is not a valid name (use letters, digits, '-', '_' or '.')"#,
            r#"listener[0].listen (line 3, col 10): "h" is not an endpoint (use host:port, [ipv6]:port or unix:/path)"#,
            r#"listener[0].backend (line 4, col 11): no backend named "x" (there is no [[backend]])"#,
            r#"listener[0].bogus (line 6, col 1): unknown key "bogus""#,
        ]
    );
    assert_eq!(
        errors("[[listener]]\n[[backend]]\n"),
        [
            "listener[0].name (line 1, col 1): missing key \"name\"",
            "listener[0].listen (line 1, col 1): missing key \"listen\"",
            "listener[0].backend (line 1, col 1): missing key \"backend\"",
            "backend[0].name (line 2, col 1): missing key \"name\"",
            "backend[0].servers (line 2, col 1): missing key \"servers\"",
        ]
    );
    assert_eq!(
        error("[[backend]]\nname = \"b\"\nservers = [\"h:1\"]\n"),
        "listener: at least one [[listener]] is required"
    );
}

#[test]
fn syntax_errors_are_one_error() {
    let e = parse("[[listener]]\nname = \"a\nlisten = 1").unwrap_err();
    assert_eq!(e.0.len(), 1);
    assert_eq!((e.0[0].key.as_str(), e.0[0].line), ("toml", 2));
    assert!(e.0[0].message.starts_with("syntax error: "), "{}", e.0[0]);
    let e = parse("a = 1\na = 2\n").unwrap_err();
    assert_eq!((e.0.len(), e.0[0].line), (1, 2), "{e}");
}

#[test]
fn datetimes_do_not_stop_the_report() {
    let errs = errors(&backend_with(
        "when = 1979-05-27T07:32:00Z\nhold_timeout = 07:32:00",
    ));
    assert_eq!(
        errs,
        [
            r#"backend[0].when (line 10, col 1): unknown key "when""#,
            r#"backend[0].hold_timeout (line 11, col 16): expected a duration like "30s", found a datetime"#,
        ]
    );
}

#[test]
fn load_reports_the_path() {
    let e = load(std::path::Path::new("/nonexistent/holdfast.toml")).unwrap_err();
    assert_eq!(e.0.len(), 1);
    assert_eq!(e.0[0].key, "/nonexistent/holdfast.toml");
    assert_eq!(e.0[0].line, 0);
    assert!(
        e.0[0]
            .message
            .starts_with("cannot read the file: no such file"),
        "{e}"
    );
    assert!(e
        .to_string()
        .starts_with("/nonexistent/holdfast.toml: cannot read"));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn garbage_is_an_error_not_a_panic(src in "\\PC*") {
        prop_assert!(parse(&src).is_err());
    }

    #[test]
    fn tomlish_garbage_is_an_error_not_a_panic(
        src in "([\\[\\]{}=\",.\\n a-z0-9_:-]|listener|backend|servers|framing|\"1MiB\"){0,80}"
    ) {
        prop_assert!(parse(&src).is_err());
    }

    /// Cut, splice or overwrite a valid file anywhere: never a panic, and
    /// every error has a key and a position inside the file.
    #[test]
    fn mangled_files_never_panic(
        at in 0usize..1000, len in 0usize..40, junk in "\\PC{0,8}"
    ) {
        let src = backend_with("ack = \"response\"\nframing = { type = \"length-prefixed\" }\nretry_responses = [\"-X\"]\nbuffer_limit = 4096");
        let mut cut = src.clone();
        let start = floor_char_boundary(&src, at % (src.len() + 1));
        let end = floor_char_boundary(&src, (start + len).min(src.len()));
        cut.replace_range(start..end, &junk);
        if let Err(errs) = parse(&cut) {
            let lines = cut.lines().count().max(1);
            for e in &errs.0 {
                prop_assert!(!e.key.is_empty());
                prop_assert!(e.key == "listener" || (e.line >= 1 && e.line <= lines + 1), "{e}");
            }
        }
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[test]
fn design_md_example_parses() {
    let c = ok(r#"
[admin]
listen = "127.0.0.1:9900"      # GET /metrics, /healthz, /sessions

[[listener]]
name = "orders"
listen = "0.0.0.0:7000"        # or "unix:/run/orders.sock"
backend = "orders"
# protocol = "tcp"             # or "resume" (an edge holdfast connects here)
# tls = { cert = "cert.pem", key = "key.pem" }

[[backend]]
name = "orders"
servers = ["127.0.0.1:7001", "unix:/run/orders-server.sock"]
protocol = "tcp"               # or "resume"
ack = "response"               # none | tcp | response  (resume implies its own acks)
framing = "lines"              # for ack = "response"
buffer_limit = "1MiB"          # per session
hold_timeout = "30s"
connect_timeout = "1s"
"#);
    assert_eq!(
        c.backends[0].ack,
        AckMode::Response(Framing::Lines {
            max_frame: 64 << 10
        })
    );
    assert_eq!(
        c.backends[0].servers[1],
        Endpoint::Unix("/run/orders-server.sock".into())
    );
}

#[test]
fn access_log_targets() {
    let base = "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\nbackend = \"b\"\n[[backend]]\nname = \"b\"\nservers = [\"127.0.0.1:1\"]\n";
    let with = |v: &str| parse(&format!("[log]\naccess = {v}\n{base}"));
    assert_eq!(
        with("\"stdout\"").unwrap().log.access,
        Some(AccessLog::Stdout)
    );
    assert_eq!(
        with("\"/var/log/holdfast/access.log\"").unwrap().log.access,
        Some(AccessLog::File("/var/log/holdfast/access.log".into()))
    );
    let err = with("\"\"").unwrap_err();
    assert_eq!(err.0[0].key, "log.access");
    let err = parse(&format!("[log]\nformat = \"x\"\n{base}")).unwrap_err();
    assert_eq!(err.0[0].key, "log.format");
}

#[test]
fn systemd_endpoints_are_for_listeners_only() {
    let c = ok(&MINIMAL.replace("127.0.0.1:7000", "systemd:orders"));
    assert_eq!(c.listeners[0].listen, Endpoint::Systemd("orders".into()));
    assert_eq!(
        error(&MINIMAL.replace("127.0.0.1:7001", "systemd:orders")),
        r#"backend[0].servers[0] (line 9, col 12): "systemd:orders": systemd:NAME is for listeners only; a server is host:port or unix:/path"#
    );
    assert_eq!(
        error(&format!("[admin]\nlisten = \"systemd:admin\"\n{MINIMAL}")),
        r#"admin.listen (line 2, col 10): "systemd:admin": the admin endpoint cannot be a systemd socket; it is tcp only (use host:port)"#
    );
    // One listener per passed name.
    let two = format!(
        "{}[[listener]]\nname = \"b\"\nlisten = \"systemd:orders\"\nbackend = \"orders\"\n",
        MINIMAL.replace("127.0.0.1:7000", "systemd:orders")
    );
    assert!(
        error(&two).contains(r#""systemd:orders" is already the listen address of listener[0]"#)
    );
}

/// The reliability limits (docs/reliability.md): per listener, per backend
/// and `[limits] fd_reserve`.
#[test]
fn reliability_limits_parse_and_default() {
    let src = r#"
[limits]
fd_reserve = 128

[[listener]]
name = "orders"
listen = "127.0.0.1:7000"
backend = "orders"
max_sessions = 100
max_sessions_per_client = 4
idle_timeout = "90s"

[[backend]]
name = "orders"
servers = ["127.0.0.1:7001"]
max_held_sessions = 50
"#;
    let c = ok(src);
    assert_eq!(c.limits.fd_reserve, 128);
    let l = &c.listeners[0];
    assert_eq!(l.max_sessions, Some(100));
    assert_eq!(l.max_sessions_per_client, Some(4));
    assert_eq!(l.idle_timeout, Some(Duration::from_secs(90)));
    assert_eq!(c.backends[0].max_held_sessions, Some(50));
    // fd_reserve 0 turns the reserve off.
    assert_eq!(
        ok(&format!("[limits]\nfd_reserve = 0\n{MINIMAL}"))
            .limits
            .fd_reserve,
        0
    );
}

#[test]
fn reliability_limits_are_checked_all_at_once() {
    let src = r#"
[limits]
fd_reserve = -1

[[listener]]
name = "orders"
listen = "127.0.0.1:7000"
backend = "orders"
max_sessions = 0
max_sessions_per_client = "4"
idle_timeout = "0s"

[[backend]]
name = "orders"
servers = ["127.0.0.1:7001"]
max_held_sessions = 0
"#;
    assert_eq!(
        errors(src),
        vec![
            "limits.fd_reserve (line 3, col 14): -1 is out of range (0 to 1000000)",
            "listener[0].max_sessions (line 9, col 16): 0 is out of range (1 to 4294967295)",
            "listener[0].max_sessions_per_client (line 10, col 27): expected an integer, found a string",
            "listener[0].idle_timeout (line 11, col 16): \"0s\" is 0; it must be more",
            "backend[0].max_held_sessions (line 16, col 21): 0 is out of range (1 to 4294967295)",
        ]
    );
}

#[test]
fn handover_socket() {
    let c = parse(&format!(
        "{MINIMAL}\n[handover]\nsocket = \"/run/holdfast/handover.sock\"\n"
    ))
    .unwrap();
    assert_eq!(
        c.handover,
        Some(HandoverConfig {
            socket: "/run/holdfast/handover.sock".into(),
            busy_within: Duration::from_millis(100),
        })
    );
    assert_eq!(parse(MINIMAL).unwrap().handover, None);
    let busy = |v: &str| {
        parse(&format!(
            "{MINIMAL}\n[handover]\nsocket = \"/a/h.sock\"\nbusy_within = \"{v}\"\n"
        ))
        .map(|c| c.handover.map(|h| h.busy_within))
    };
    assert_eq!(busy("0ms").unwrap(), Some(Duration::ZERO));
    assert_eq!(busy("2h").unwrap(), Some(Duration::from_secs(7200)));
}

#[test]
fn handover_errors() {
    assert_eq!(
        error(&format!(
            "{MINIMAL}\n[handover]\nsocket = \"relative.sock\"\n"
        )),
        "handover.socket (line 12, col 10): must be an absolute path"
    );
    assert!(error(&format!("{MINIMAL}\n[handover]\n")).contains("missing key \"socket\""));
    assert_eq!(
        error(&format!(
            "{MINIMAL}\n[handover]\nsocket = \"/a/h.sock\"\nbusy_within = \"soon\"\n"
        )),
        "handover.busy_within (line 13, col 15): \"soon\" is not a duration (use ms, s, m or h)"
    );
    assert!(error(&format!(
        "{MINIMAL}\n[handover]\nsocket = \"/a\"\npath = 1\n"
    ))
    .contains("handover.path"));
}

/// The example failover key, by absolute path.
fn failover_key() -> String {
    format!("{}/config/example-failover.key", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn failover_active_and_standby() {
    let key = failover_key();
    let c = ok(&format!(
        "[failover]\nrole = \"active\"\npeer = \"10.0.0.2:7100\"\nsecret_file = \"{key}\"\n{MINIMAL}"
    ));
    let f = c.failover.expect("failover");
    assert_eq!(
        f.role,
        FailoverRole::Active {
            peer: "10.0.0.2:7100".into()
        }
    );
    assert_eq!(f.heartbeat_interval, Duration::from_millis(10));
    assert_eq!(f.dead_peer_timeout, Duration::from_millis(100));
    assert_eq!(f.listeners, [0], "every plain tcp listener by default");
    assert_eq!(f.key.0.as_ref(), std::fs::read(&key).unwrap().as_slice());

    let c = ok(&format!(
        "[failover]\nrole = \"standby\"\nlisten = \"0.0.0.0:7100\"\nsecret_file = \"{key}\"\n\
         heartbeat_interval = \"5ms\"\ndead_peer_timeout = \"20ms\"\n\
         service_address = \"10.0.0.100/24\"\ninterface = \"eth1\"\nlisteners = [\"orders\"]\n{MINIMAL}"
    ));
    let f = c.failover.expect("failover");
    assert_eq!(
        f.role,
        FailoverRole::Standby {
            listen: "0.0.0.0:7100".into(),
            service_address: std::net::Ipv4Addr::new(10, 0, 0, 100),
            prefix: 24,
            interface: "eth1".into(),
        }
    );
    assert_eq!(f.heartbeat_interval, Duration::from_millis(5));
    assert_eq!(f.dead_peer_timeout, Duration::from_millis(20));
    assert_eq!(f.listeners, [0]);
    assert!(
        !format!("{f:?}").contains("NOT SECRET"),
        "the key never prints"
    );
}

#[test]
fn failover_errors_name_key_and_line() {
    let key = failover_key();
    assert_eq!(
        errors(&format!(
            "[failover]\nrole = \"primary\"\nsecret_file = \"{key}\"\n{MINIMAL}"
        )),
        [r#"failover.role (line 2, col 8): unknown role "primary" (use active or standby)"#]
    );
    assert_eq!(
        errors(&format!(
            "[failover]\nrole = \"active\"\nsecret_file = \"{key}\"\nlisten = \"1.2.3.4:1\"\n\
             peer = \"unix:/x\"\ndead_peer_timeout = \"10ms\"\n{MINIMAL}"
        )),
        [
            r#"failover.listen (line 4, col 10): listen applies to role = "standby" only"#,
            r#"failover.peer (line 5, col 8): the replication link is tcp only (use host:port)"#,
            r#"failover.dead_peer_timeout (line 6, col 21): dead_peer_timeout (10ms) must be longer than heartbeat_interval (10ms)"#,
        ]
    );
    assert_eq!(
        errors(&format!(
            "[failover]\nrole = \"standby\"\nsecret_file = \"{key}\"\nlisten = \"1.2.3.4:1\"\n\
             service_address = \"10.0.0.1/33\"\ninterface = \"a/b\"\nlisteners = [\"orders\", \"orders\"]\n{MINIMAL}"
        )),
        [
            r#"failover.service_address (line 5, col 19): "10.0.0.1/33" is not an IPv4 address with an optional prefix length (like "10.0.0.100/24")"#,
            r#"failover.interface (line 6, col 13): "a/b" is not an interface name"#,
            r#"failover.listeners[1] (line 7, col 24): listener "orders" is named twice"#,
        ]
    );
    assert_eq!(
        errors(&format!(
            "[failover]\nrole = \"active\"\npeer = \"h:1\"\n{MINIMAL}"
        )),
        [
            r#"failover.secret_file (line 1, col 1): missing key "secret_file" (a file with at least 32 random bytes)"#
        ]
    );
    let short = std::env::temp_dir().join(format!("holdfast-short-{}.key", std::process::id()));
    std::fs::write(&short, b"short").unwrap();
    let errs = errors(&format!(
        "[failover]\nrole = \"active\"\npeer = \"h:1\"\nsecret_file = {:?}\n{MINIMAL}",
        short.display().to_string()
    ));
    std::fs::remove_file(&short).unwrap();
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].contains("holds 5 bytes; a failover key needs at least 32"),
        "{errs:?}"
    );
}

#[test]
fn failover_needs_a_repairable_listener() {
    let key = failover_key();
    let tls_free_unix = r#"
[[listener]]
name = "local"
listen = "unix:/tmp/holdfast-failover-test.sock"
backend = "b"

[[backend]]
name = "b"
servers = ["127.0.0.1:7001"]
"#;
    assert_eq!(
        errors(&format!("[failover]\nrole = \"active\"\npeer = \"h:1\"\nsecret_file = \"{key}\"\n{tls_free_unix}")),
        [r#"failover.listeners (line 1, col 1): no listener can fail over: only plain tcp listeners can (no tls, no unix socket, no resume protocol)"#]
    );
}

/// `[runtime] scheduler` unset is `"per-thread"`, or `"work-stealing"`
/// when a listener speaks the resume protocol (its sessions run with the
/// listener's own tasks); set, it is kept either way.
#[test]
fn the_scheduler_default_follows_the_listeners() {
    assert_eq!(ok(MINIMAL).runtime.scheduler, Scheduler::PerThread);
    let key = failover_key();
    let core = MINIMAL.replacen(
        "backend = \"orders\"\n",
        &format!(
            "backend = \"orders\"\nprotocol = \"resume\"\nresume = {{ secret_file = \"{key}\" }}\n"
        ),
        1,
    );
    assert_eq!(ok(&core).runtime.scheduler, Scheduler::WorkStealing);
    let chosen = format!("[runtime]\nscheduler = \"per-thread\"\n{core}");
    assert_eq!(ok(&chosen).runtime.scheduler, Scheduler::PerThread);
}

/// `resume.early_data`: on by default for a backend, can be turned off,
/// and is an error on a listener (the initiator is the one that sends it).
#[test]
fn resume_early_data_is_a_backend_switch() {
    let key = failover_key();
    let cfg = |extra: &str| {
        format!(
            "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\nbackend = \"b\"\n\n\
             [[backend]]\nname = \"b\"\nservers = [\"127.0.0.1:9\"]\nprotocol = \"resume\"\n\
             resume = {{ secret_file = \"{key}\"{extra} }}\n"
        )
    };
    let early = |c: &crate::config::Config| match &c.backends[0].ack {
        AckMode::Resume(s) => s.early_data,
        other => panic!("{other:?}"),
    };
    assert!(early(&ok(&cfg(""))));
    assert!(!early(&ok(&cfg(", early_data = false"))));
    let e = error(&format!(
        "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\nbackend = \"b\"\nprotocol = \"resume\"\n\
         resume = {{ secret_file = \"{key}\", early_data = true }}\n\n\
         [[backend]]\nname = \"b\"\nservers = [\"127.0.0.1:9\"]\n"
    ));
    assert!(e.contains("early_data only applies to backends"), "{e}");
}
