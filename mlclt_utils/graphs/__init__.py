"""Attribution graphs: the circuit-tracer bridge (``circuit_tracer``); graph building and
figures come with chapter 06."""
