//! The review side: what reads a trail, and never writes to it. Reading segments
//! where they lie (a directory, shipped objects), searching them by their indexes,
//! verifying their chain, seals and signatures, and exporting them; and who may read
//! what of them through the console ([`access`]).

pub mod access;
pub mod bundle;
pub mod drift;
pub mod export;
pub mod graph;
pub mod proof;
pub mod reader;
pub mod search;
pub mod tally;
pub mod turns;
pub mod verify;
