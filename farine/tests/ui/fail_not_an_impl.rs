#[farine::service]
pub struct Relay;

fn main() {}
