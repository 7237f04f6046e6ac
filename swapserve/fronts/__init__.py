"""HTTP fronts: processes that each run the gateway and pass the controller one frame per call
(``swapserve serve --fronts K``), so that HTTP work is spread over cores while one controller schedules."""
