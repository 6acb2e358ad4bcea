//! A peer process for attestation tests (CONFORMANCE.md item 96).
//!
//! `spiffed-test-peer inherit SOCKET exit|stay`: connects to SOCKET, then starts a child that
//! inherits the connection (as its stdin). With `exit` the parent exits at once and the child
//! waits until the parent has been reaped before it sends FetchX509SVID on the inherited
//! connection; with `stay` the parent stays alive until the child is done. The child prints
//! `OK <spiffe_id>...` (every SVID's, `svids[0]` first) or `ERR <code> <message>` on stdout.
//!
//! `spiffed-test-peer hold SOCKET N SECONDS`: opens up to N connections to SOCKET and sends
//! nothing on them (a connection the socket's backlog cannot take is not counted), prints
//! `OPEN <count>`, then every 100 ms `CLOSED <count>`: how many of them the agent has closed.
//! Ends with `END <count>` when all are closed or SECONDS have passed.
#![forbid(unsafe_code)]
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "test tool output"
)]

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use spiffed_proto::workload::X509svidRequest;
use spiffed_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tonic::transport::Endpoint;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("inherit") => parent(&args),
        Some("child") => child(&args),
        Some("hold") => hold(&args),
        _ => {
            eprintln!("usage: spiffed-test-peer inherit SOCKET exit|stay");
            ExitCode::from(64)
        }
    }
}

fn parent(args: &[String]) -> ExitCode {
    let (Some(socket), Some(mode)) = (args.get(2), args.get(3)) else {
        eprintln!("usage: spiffed-test-peer inherit SOCKET exit|stay");
        return ExitCode::from(64);
    };
    let conn = match std::os::unix::net::UnixStream::connect(socket) {
        Ok(c) => c,
        Err(e) => {
            println!("ERR connect {e}");
            return ExitCode::FAILURE;
        }
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            println!("ERR exe {e}");
            return ExitCode::FAILURE;
        }
    };
    let me = std::process::id().to_string();
    let wait_for_parent = if mode == "exit" { me.as_str() } else { "0" };
    let child = Command::new(exe)
        .arg("child")
        .arg(wait_for_parent)
        .stdin(Stdio::from(OwnedFd::from(conn)))
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            println!("ERR spawn {e}");
            return ExitCode::FAILURE;
        }
    };
    if mode == "stay" {
        let _ = child.wait();
    }
    ExitCode::SUCCESS
}

fn child(args: &[String]) -> ExitCode {
    let parent: u32 = args.get(2).and_then(|p| p.parse().ok()).unwrap_or(0);
    if parent != 0 {
        // Wait until the parent is gone for good (reaped), so its pid no longer names it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{parent}")).exists() {
            if Instant::now() > deadline {
                println!("ERR timeout parent {parent} still exists");
                return ExitCode::FAILURE;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let fd = match std::io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => fd,
        Err(e) => {
            println!("ERR stdin {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            println!("ERR runtime {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let std_stream = std::os::unix::net::UnixStream::from(fd);
        if let Err(e) = std_stream.set_nonblocking(true) {
            println!("ERR nonblocking {e}");
            return ExitCode::FAILURE;
        }
        let stream = match tokio::net::UnixStream::from_std(std_stream) {
            Ok(s) => s,
            Err(e) => {
                println!("ERR tokio {e}");
                return ExitCode::FAILURE;
            }
        };
        let slot = Arc::new(Mutex::new(Some(stream)));
        let endpoint = match Endpoint::try_from("http://localhost") {
            Ok(e) => e,
            Err(e) => {
                println!("ERR endpoint {e}");
                return ExitCode::FAILURE;
            }
        };
        let channel = endpoint
            .connect_with_connector(tower::service_fn(move |_| {
                let s = slot.lock().ok().and_then(|mut g| g.take());
                async move {
                    s.map(TokioIo::new)
                        .ok_or_else(|| std::io::Error::other("the inherited connection is used up"))
                }
            }))
            .await;
        let channel = match channel {
            Ok(c) => c,
            Err(e) => {
                println!("ERR channel {e}");
                return ExitCode::FAILURE;
            }
        };
        let mut client = SpiffeWorkloadApiClient::new(channel);
        let mut req = tonic::Request::new(X509svidRequest {});
        if let Ok(v) = "true".parse() {
            req.metadata_mut().insert("workload.spiffe.io", v);
        }
        let result = match client.fetch_x509svid(req).await {
            Ok(resp) => resp.into_inner().message().await,
            Err(status) => Err(status),
        };
        match result {
            Ok(Some(msg)) => {
                let ids: Vec<&str> = msg.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
                println!("OK {}", ids.join(" "));
            }
            Ok(None) => println!("ERR empty stream"),
            Err(s) => println!("ERR {:?} {}", s.code(), s.message()),
        }
        ExitCode::SUCCESS
    })
}

fn hold(args: &[String]) -> ExitCode {
    let (Some(socket), Some(Ok(n)), Some(Ok(seconds))) = (
        args.get(2),
        args.get(3).map(|n| n.parse::<usize>()),
        args.get(4).map(|s| s.parse::<u64>()),
    ) else {
        eprintln!("usage: spiffed-test-peer hold SOCKET N SECONDS");
        return ExitCode::from(64);
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            println!("ERR runtime {e}");
            return ExitCode::FAILURE;
        }
    };
    // tokio connects without blocking: a full backlog is an error, not a wait.
    let conns: Vec<std::os::unix::net::UnixStream> = rt.block_on(async {
        let mut conns = Vec::new();
        for _ in 0..n {
            match tokio::net::UnixStream::connect(socket).await {
                Ok(c) => match c.into_std() {
                    Ok(c) => conns.push(c),
                    Err(e) => eprintln!("into_std: {e}"),
                },
                Err(e) => eprintln!("connect: {e}"),
            }
        }
        conns
    });
    println!("OPEN {}", conns.len());
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut closed = vec![false; conns.len()];
    loop {
        for (conn, closed) in conns.iter().zip(closed.iter_mut()) {
            if *closed {
                continue;
            }
            let mut buf = [0u8; 4096];
            // The agent's SETTINGS frame may come first; only end of file (or an error
            // other than "nothing yet") counts as closed.
            *closed = match std::io::Read::read(&mut &*conn, &mut buf) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            };
        }
        let count = closed.iter().filter(|&&c| c).count();
        println!("CLOSED {count}");
        if count == conns.len() || Instant::now() > deadline {
            println!("END {count}");
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
