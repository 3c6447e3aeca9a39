farine::main!(layers = [service::Timing]);
