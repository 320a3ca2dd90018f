//! The WebSocket codec: SSH carried in binary (or text) frames, on `ws://` (the client's
//! socket) or `wss://` (inside the TLS session).
//!
//! - client → upstream: the client's frames are masked, so this direction copies: read
//!   into a buffer, decode and unmask in place, send the payload. Pings are answered,
//!   pongs dropped, a Close (or a FIN) is the client's end of stream; a protocol violation
//!   ends the connection (Close 1002 to the client, a reset to the upstream).
//! - upstream → client on `ws://`: zero-copy once it streams: each read from the upstream
//!   (spliced into a pipe) goes out as one frame, its 2–10 byte header sent with `MSG_MORE`
//!   and the payload spliced after it. Never an empty frame. Control frames go out only
//!   between frames. The upstream's FIN becomes a Close (1000) after the last data, then
//!   a FIN.
//! - upstream → client on `wss://`: each read is one frame written into the TLS session.
//!
//! `portrelay_bytes_total` counts payload bytes, as for the other entrances.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::time::Duration;

use rustls::ServerConnection;

use super::{plain, tls};
use crate::relay::connection::{
    deliver, drain_up_to, end_of_stream, pass_eof, would_block, Direction, Drained, Failure,
    HalfState, Side, Turn, ROUNDS_PER_TURN,
};
use crate::relay::pipe::PipePool;
use crate::sys;
use crate::tls::FdIo;
use crate::websocket::frame::{self, ControlFrame, ControlPayload, Decoder, Header, Item};

/// The largest data frame sent: a read from the upstream (up to a pipe, 1 MiB) goes out as
/// frames of at most this much. Clients read in buffers of about this size (websocat's is
/// 64 KiB), and frames longer than their buffer take a path of theirs that stalls now and
/// then.
const MAX_FRAME: usize = 64 * 1024;

/// Plaintext read from the upstream per frame on `wss://` (one TLS record's payload).
const RECORD: usize = 16 * 1024;

/// A WebSocket client end.
pub struct WsCodec {
    decoder: Decoder,
    /// Client bytes that came after the upgrade request: decoded before any new read.
    early: Vec<u8>,
    /// The header of the frame whose payload is held now (upstream → client), and how
    /// many of its bytes are sent.
    header: Option<(Header, usize)>,
    /// The Pong owed for the client's latest Ping (an earlier one needs none).
    pong: Option<ControlPayload>,
    /// A keepalive Ping is owed (`ping_interval` passed without traffic).
    ping: bool,
    /// `ping_interval` of its entry.
    pub ping_every: Option<Duration>,
    /// A Close to send: the code.
    close: Option<u16>,
    /// Payload bytes of the frame being sent that are not sent yet (upstream → client).
    frame_left: usize,
    /// A control frame on its way out, and how many of its bytes are sent.
    sending: Option<(ControlFrame, usize)>,
    close_sent: bool,
    /// `wss://`: the TLS session that carries the frames.
    tls: Option<Box<ServerConnection>>,
}

impl WsCodec {
    pub fn new(
        early: Vec<u8>,
        tls: Option<Box<ServerConnection>>,
        ping_every: Option<Duration>,
    ) -> WsCodec {
        WsCodec {
            decoder: Decoder::new(),
            early,
            header: None,
            pong: None,
            ping: false,
            ping_every,
            frame_left: 0,
            close: None,
            sending: None,
            close_sent: false,
            tls,
        }
    }

    /// Owes the client a keepalive Ping, sent at the next frame boundary.
    pub fn queue_ping(&mut self) {
        self.ping = true;
    }

    /// client → upstream.
    pub(super) fn pump_to_upstream(
        &mut self,
        client: &mut Side,
        upstream: &mut Side,
        dir: &mut Direction,
        last: bool,
        pool: &mut PipePool,
    ) -> Result<Turn, Failure> {
        for _ in 0..ROUNDS_PER_TURN {
            if deliver(upstream, dir, last, pool)? {
                return Ok(Turn::Wait);
            }
            let mut hold = pool.take_buffer();
            let mut eof = false;
            let mut close = false;
            let read = hold.fill_with(|buf| {
                let n = self.read_client(client, buf)?;
                eof = n == 0;
                let (payload, saw_close) = self.decode(&mut buf[..n])?;
                close = saw_close;
                Ok(payload)
            });
            match read {
                Ok(n) => {
                    if n > 0 {
                        dir.in_flight = n;
                        dir.hold = Some(hold);
                    } else {
                        pool.give_back(hold);
                    }
                    if eof {
                        end_of_stream(client, dir)?;
                    } else if close {
                        // The client's Close: its end of stream (no more data follows).
                        dir.state = HalfState::Eof;
                    }
                }
                Err(e) if would_block(&e) => {
                    pool.give_back(hold);
                    return Ok(Turn::Wait);
                }
                Err(e) => {
                    pool.give_back(hold);
                    if e.kind() == io::ErrorKind::InvalidData {
                        // A protocol violation: tell the client why, as far as it can hear.
                        self.send_now(client, frame::close(1002));
                    }
                    return Err(Failure::Read(e));
                }
            }
        }
        Ok(Turn::Yield)
    }

    /// Reads client bytes: what came after the upgrade request first, then the socket
    /// (or the TLS session). 0 is the client's end of stream.
    fn read_client(&mut self, client: &mut Side, buf: &mut [u8]) -> io::Result<usize> {
        if !self.early.is_empty() {
            let n = self.early.len().min(buf.len());
            buf[..n].copy_from_slice(&self.early[..n]);
            self.early.drain(..n);
            if self.early.is_empty() {
                // An idle connection holds no buffer.
                self.early = Vec::new();
            }
            return Ok(n);
        }
        let fd = client.fd.as_raw_fd();
        let Some(tls) = self.tls.as_mut() else {
            if !client.readable {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            return match sys::recv(fd, buf) {
                Ok(n) if n < buf.len() => {
                    client.readable = client.hup;
                    Ok(n)
                }
                Err(e) if would_block(&e) => {
                    client.readable = false;
                    Err(e)
                }
                other => other,
            };
        };
        loop {
            match tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(e),
            }
            if !client.readable {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            match tls.read_tls(&mut FdIo(fd)) {
                Ok(0) => return Ok(0),
                Ok(_) => {
                    if let Err(e) = tls.process_new_packets() {
                        let _ = tls.write_tls(&mut FdIo(fd));
                        return Err(io::Error::other(format!("TLS: {e}")));
                    }
                }
                Err(e) if would_block(&e) => {
                    client.readable = false;
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Decodes `buf` in place: the payload is moved to its front. Returns the payload's
    /// length and whether a Close came (what follows it is dropped).
    fn decode(&mut self, buf: &mut [u8]) -> io::Result<(usize, bool)> {
        let (mut at, mut out) = (0, 0);
        while at < buf.len() {
            let (used, item) = self.decoder.decode(&mut buf[at..]).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("WebSocket: {e}"))
            })?;
            match item {
                Item::Data(range) => {
                    let (start, end) = (at + range.start, at + range.end);
                    buf.copy_within(start..end, out);
                    out += end - start;
                }
                Item::Ping(payload) => self.pong = Some(payload),
                Item::Pong => {}
                // Answered with our own Close once the upstream's output has ended: the
                // client's Close is a half-close (sshd's output keeps flowing).
                Item::Close(_) => return Ok((out, true)),
                Item::NeedMore => {}
            }
            at += used;
            if used == 0 {
                break;
            }
        }
        Ok((out, false))
    }

    /// Sends a control frame at once, best effort (the connection is ending).
    fn send_now(&mut self, client: &Side, control: ControlFrame) {
        match self.tls.as_mut() {
            None => {
                let _ = sys::send(client.fd.as_raw_fd(), control.as_bytes());
            }
            Some(tls) => {
                let _ = tls.writer().write_all(control.as_bytes());
                let _ = tls.write_tls(&mut FdIo(client.fd.as_raw_fd()));
            }
        }
        self.close_sent = true;
    }

    /// upstream → client.
    pub(super) fn pump_to_client(
        &mut self,
        upstream: &mut Side,
        client: &mut Side,
        dir: &mut Direction,
        last: bool,
        pool: &mut PipePool,
    ) -> Result<Turn, Failure> {
        if self.tls.is_some() {
            return self.pump_to_client_tls(upstream, client, dir, last);
        }
        for _ in 0..ROUNDS_PER_TURN {
            if dir.ended() {
                return Ok(Turn::Wait);
            }
            if dir.in_flight > 0 {
                if self.frame_left == 0 {
                    // The next frame of what is held.
                    let len = dir.in_flight.min(MAX_FRAME);
                    self.header = frame::data_header(len).map(|h| (h, 0));
                    self.frame_left = len;
                }
                if !self.send_header(client)? {
                    return Ok(Turn::Wait);
                }
                let before = dir.in_flight;
                let drained = drain_up_to(client, dir, pool, self.frame_left)?;
                self.frame_left -= before - dir.in_flight;
                if let Drained::Blocked = drained {
                    return Ok(Turn::Wait);
                }
                if dir.in_flight > 0 {
                    continue;
                }
            }
            // Between frames: control frames, then the end of stream.
            if !self.send_controls(client)? {
                return Ok(Turn::Wait);
            }
            if dir.state == HalfState::Eof {
                if !self.close_sent {
                    self.close.get_or_insert(1000);
                    if !self.send_controls(client)? {
                        return Ok(Turn::Wait);
                    }
                }
                pass_eof(client, dir, last);
                return Ok(Turn::Wait);
            }
            if !upstream.readable {
                return Ok(Turn::Wait);
            }
            if !plain::refill(upstream, dir, pool)? {
                return Ok(Turn::Wait);
            }
        }
        Ok(if dir.ended() { Turn::Wait } else { Turn::Yield })
    }

    /// Sends what is left of the current frame's header. `false`: the client is not
    /// writable now.
    fn send_header(&mut self, client: &mut Side) -> Result<bool, Failure> {
        let Some((header, sent)) = self.header.as_mut() else {
            return Ok(true);
        };
        let bytes = header.as_bytes();
        while *sent < bytes.len() {
            if !client.writable {
                return Ok(false);
            }
            match sys::send_more(client.fd.as_raw_fd(), &bytes[*sent..]) {
                Ok(n) => *sent += n,
                Err(e) if would_block(&e) => {
                    client.writable = false;
                    return Ok(false);
                }
                Err(e) => return Err(Failure::Write(e)),
            }
        }
        self.header = None;
        Ok(true)
    }

    /// Sends the control frames owed (a Pong, a Close), between data frames.
    fn send_controls(&mut self, client: &mut Side) -> Result<bool, Failure> {
        loop {
            if self.sending.is_none() {
                self.sending = if let Some(p) = self.pong.take() {
                    Some((frame::pong(&p), 0))
                } else if std::mem::take(&mut self.ping) && !self.close_sent {
                    Some((frame::ping(&ControlPayload::EMPTY), 0))
                } else if let (Some(code), false) = (self.close, self.close_sent) {
                    self.close_sent = true;
                    Some((frame::close(code), 0))
                } else {
                    return Ok(true);
                };
            }
            let (control, sent) = self.sending.as_mut().expect("set above");
            let bytes = control.as_bytes();
            while *sent < bytes.len() {
                if !client.writable {
                    return Ok(false);
                }
                match sys::send(client.fd.as_raw_fd(), &bytes[*sent..]) {
                    Ok(n) => *sent += n,
                    Err(e) if would_block(&e) => {
                        client.writable = false;
                        return Ok(false);
                    }
                    Err(e) => return Err(Failure::Write(e)),
                }
            }
            self.sending = None;
        }
    }

    /// upstream → client on `wss://`: each read becomes one frame in the TLS session.
    fn pump_to_client_tls(
        &mut self,
        upstream: &mut Side,
        client: &mut Side,
        dir: &mut Direction,
        last: bool,
    ) -> Result<Turn, Failure> {
        let mut buf = [0u8; RECORD];
        for _ in 0..ROUNDS_PER_TURN {
            if dir.ended() {
                return Ok(Turn::Wait);
            }
            let pong = self.pong.take();
            let ping = std::mem::take(&mut self.ping) && !self.close_sent;
            let tls = self.tls.as_mut().expect("a wss codec has a session");
            if let Some(p) = pong {
                tls.writer()
                    .write_all(frame::pong(&p).as_bytes())
                    .map_err(Failure::Write)?;
            }
            if ping {
                tls.writer()
                    .write_all(frame::ping(&ControlPayload::EMPTY).as_bytes())
                    .map_err(Failure::Write)?;
            }
            if !tls::flush(tls, client)? {
                return Ok(Turn::Wait);
            }
            if dir.state == HalfState::Eof {
                pass_eof(client, dir, last);
                return Ok(Turn::Wait);
            }
            if !upstream.readable {
                return Ok(Turn::Wait);
            }
            match sys::recv(upstream.fd.as_raw_fd(), &mut buf) {
                Ok(0) => {
                    end_of_stream(upstream, dir)?;
                    if !std::mem::replace(&mut self.close_sent, true) {
                        tls.writer()
                            .write_all(frame::close(1000).as_bytes())
                            .map_err(Failure::Write)?;
                    }
                    tls.send_close_notify();
                }
                Ok(n) => {
                    let header = frame::data_header(n).expect("n > 0");
                    let mut w = tls.writer();
                    w.write_all(header.as_bytes()).map_err(Failure::Write)?;
                    w.write_all(&buf[..n]).map_err(Failure::Write)?;
                    dir.bytes += n as u64;
                }
                Err(e) if would_block(&e) => {
                    upstream.readable = false;
                    return Ok(Turn::Wait);
                }
                Err(e) => return Err(Failure::Read(e)),
            }
        }
        Ok(Turn::Yield)
    }
}

/// A `ws://` codec across an upgrade (a `wss://` one has a TLS session, which cannot move).
impl WsCodec {
    pub fn can_move(&self) -> bool {
        self.tls.is_none()
    }

    pub fn save(&self) -> Vec<u8> {
        use crate::upgrade::wire::Writer;
        use frame::saved;
        let mut w = Writer::default();
        saved::decoder(&self.decoder, &mut w);
        w.bytes(&self.early);
        w.bool(self.header.is_some());
        if let Some((h, sent)) = &self.header {
            saved::header(h, &mut w);
            w.u64(*sent as u64);
        }
        w.bool(self.pong.is_some());
        if let Some(p) = &self.pong {
            saved::control_payload(p, &mut w);
        }
        w.bool(self.ping);
        w.u64(self.ping_every.map_or(0, |d| d.as_millis() as u64));
        w.u32(self.close.map_or(u32::MAX, u32::from));
        w.u64(self.frame_left as u64);
        w.bool(self.sending.is_some());
        if let Some((f, sent)) = &self.sending {
            saved::control_frame(f, &mut w);
            w.u64(*sent as u64);
        }
        w.bool(self.close_sent);
        w.0
    }

    pub fn load(bytes: &[u8]) -> Result<WsCodec, crate::upgrade::wire::WireError> {
        use crate::upgrade::wire::Reader;
        use frame::saved;
        let mut r = Reader(bytes);
        let decoder = saved::load_decoder(&mut r)?;
        let early = r.bytes("early bytes")?.to_vec();
        let header = if r.bool("header")? {
            let h = saved::load_header(&mut r)?;
            let sent = (r.u64("header sent")? as usize).min(h.as_bytes().len());
            Some((h, sent))
        } else {
            None
        };
        let pong = if r.bool("pong")? {
            Some(saved::load_control_payload(&mut r)?)
        } else {
            None
        };
        let ping = r.bool("ping")?;
        let ping_every = Some(r.u64("ping interval")?)
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis);
        let close = u16::try_from(r.u32("close code")?).ok();
        let frame_left = r.u64("frame left")? as usize;
        let sending = if r.bool("sending")? {
            let f = saved::load_control_frame(&mut r)?;
            let sent = (r.u64("control sent")? as usize).min(f.as_bytes().len());
            Some((f, sent))
        } else {
            None
        };
        let close_sent = r.bool("close sent")?;
        Ok(WsCodec {
            decoder,
            early,
            header,
            pong,
            ping,
            ping_every,
            close,
            frame_left,
            sending,
            close_sent,
            tls: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `ws://` codec saved in the middle of things (a frame header half sent, a Pong and
    /// a Close owed, early bytes, a decoder inside a masked frame) comes back the same:
    /// saving the loaded one gives the same bytes, and the loaded decoder unmasks the rest
    /// of the frame as the original does.
    #[test]
    fn a_codec_saved_mid_frame_comes_back_the_same() {
        let mut ws = WsCodec::new(b"early".to_vec(), None, Some(Duration::from_secs(7)));
        let mut frame = vec![0x82, 0x85, 1, 2, 3, 4];
        frame.extend(b"hello".iter().zip([1, 2, 3, 4, 1]).map(|(b, k)| b ^ k));
        let mut head = frame[..8].to_vec();
        let (used, _) = ws.decoder.decode(&mut head).unwrap();
        assert!(used > 0);
        ws.header = frame::data_header(300).map(|h| (h, 2));
        ws.frame_left = 300;
        ws.pong = frame::ControlPayload::new(b"p");
        ws.close = Some(1001);
        ws.ping = true;
        let saved = ws.save();
        let mut back = WsCodec::load(&saved).unwrap();
        assert_eq!(back.save(), saved);
        assert_eq!(back.early, b"early");
        assert_eq!(back.ping_every, Some(Duration::from_secs(7)));
        assert_eq!(back.frame_left, 300);
        assert_eq!(
            back.header
                .as_ref()
                .map(|(h, s)| (h.as_bytes().to_vec(), *s)),
            ws.header.as_ref().map(|(h, s)| (h.as_bytes().to_vec(), *s))
        );
        let mut rest_a = frame[used..].to_vec();
        let mut rest_b = frame[used..].to_vec();
        let a = ws.decoder.decode(&mut rest_a).map(|(n, _)| n).unwrap();
        let b = back.decoder.decode(&mut rest_b).map(|(n, _)| n).unwrap();
        assert_eq!(
            (a, &rest_a[..a]),
            (b, &rest_b[..b]),
            "the same payload, unmasked alike"
        );
        for cut in 0..saved.len() {
            assert!(WsCodec::load(&saved[..cut]).is_err(), "cut at {cut}");
        }
    }
}
