mod hub;

fn main() {}
