//! Clients of the pod servers' protocol (see [`crate::server`]). These run in the calling
//! thread's namespace; [`crate::Pod`] wraps them to run inside a pod.
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};

/// Default timeout for connecting, each read and each write.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// A server's answer: the pod name it announced, and the bytes it echoed.
pub type Reply = (String, Vec<u8>);

/// Connects to `addr:port`, sends `payload`, shuts down the write side and reads the whole
/// answer. The write runs on its own thread so a large payload cannot deadlock against the echo.
pub fn tcp_request(addr: Ipv4Addr, port: u16, payload: &[u8], timeout: Duration) -> Result<Reply> {
    let to = SocketAddr::from((addr, port));
    let run = || -> Result<Vec<u8>> {
        let mut stream = TcpStream::connect_timeout(&to, timeout).context("connect")?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut writer = stream.try_clone()?;
        let mut answer = Vec::new();
        thread::scope(|s| {
            let sent = s.spawn(move || -> Result<()> {
                writer.write_all(payload).context("write")?;
                writer.shutdown(Shutdown::Write).context("shutdown(write)")
            });
            let read = stream.read_to_end(&mut answer).context("read");
            sent.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
            read
        })?;
        Ok(answer)
    };
    let answer = run().with_context(|| format!("TCP request to {to}"))?;
    split_reply(&answer).with_context(|| format!("TCP reply from {to}"))
}

/// Sends `payload` as one datagram to `addr:port` and waits for the reply, which must come from
/// `addr:port` (a reply from anywhere else means the reverse translation is missing).
pub fn udp_request(addr: Ipv4Addr, port: u16, payload: &[u8], timeout: Duration) -> Result<Reply> {
    let to = SocketAddrV4::new(addr, port);
    let run = || -> Result<Vec<u8>> {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        socket.set_read_timeout(Some(timeout))?;
        socket.send_to(payload, to).context("send")?;
        let mut buf = vec![0; 65536];
        let (n, from) = socket.recv_from(&mut buf).context("no reply")?;
        if from != SocketAddr::V4(to) {
            bail!("reply came from {from}, not from {to} (reverse NAT missing?)");
        }
        buf.truncate(n);
        Ok(buf)
    };
    let answer = run().with_context(|| format!("UDP request to {to}"))?;
    split_reply(&answer).with_context(|| format!("UDP reply from {to}"))
}

/// Splits `<name>\n<rest>`.
fn split_reply(answer: &[u8]) -> Result<Reply> {
    let nl = answer
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| anyhow!("no server name line in {} bytes", answer.len()))?;
    let name = std::str::from_utf8(&answer[..nl]).context("server name is not UTF-8")?;
    ensure!(!name.is_empty(), "empty server name");
    Ok((name.to_owned(), answer[nl + 1..].to_vec()))
}
