// A web: process on $BIND_ADDRESS:$PORT, standard library only (no crates to download).
use std::io::{Read, Write};
use std::net::TcpListener;

fn main() {
    let host = std::env::var("BIND_ADDRESS").unwrap_or_else(|_| "127.0.0.1".into());
    let port = std::env::var("PORT").expect("PORT");
    let listener = TcpListener::bind(format!("{}:{}", host, port)).expect("bind");
    for stream in listener.incoming() {
        let mut stream = match stream { Ok(s) => s, Err(_) => continue };
        let mut buf = [0u8; 4096];
        let _ = stream.read(&mut buf);
        let body = "rust-web v1\n";
        let _ = write!(stream, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}", body.len(), body);
    }
}
