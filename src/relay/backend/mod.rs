//! The backends: [`driver::Driver`] is the readiness interface the loop is written
//! against; `uring` (io_uring) and `epoll` implement it.

mod chunk;
pub mod driver;
pub mod epoll;
pub mod uring;
