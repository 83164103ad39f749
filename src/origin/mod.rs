//! Origins: upstream pools of HTTP backends (I/O), and origin stores:
//! directories read with O_DIRECT through a block planner (pure) that
//! merges neighbouring reads.

pub mod body;
pub mod planner;
pub mod pool;
pub mod store;
pub mod upstream;
