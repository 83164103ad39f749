//! Origins: upstream pools of HTTP backends (I/O). The origin store lands with
//! its own issue.

pub mod body;
pub mod planner;
pub mod pool;
pub mod upstream;
