"""Calibration prompts for the equivalence checks (reranker.equivalence).

Written for this project, short and general: they only need to exercise a
layer the way real requests do (instruction, query, several documents, the
final segment), so two blocks that agree here agree in service.
"""

CALIBRATION_BLOCK_TOKENS = 48

CALIBRATION: list[tuple[str, list[tuple[str, str]]]] = [
    ("Does regular exercise lower blood pressure in adults?", [
        ("Aerobic training and hypertension", "In a twelve-week trial, adults who walked briskly five days a week "
         "lowered their systolic blood pressure by about five points compared with inactive controls."),
        ("Coffee and sleep", "Caffeine taken late in the day delays sleep onset and shortens deep sleep."),
        ("Strength training in older people", "Resistance exercise twice a week improved muscle strength and "
         "balance; blood pressure changed little."),
        ("Salt intake", "Cutting dietary sodium lowers blood pressure, most strongly in people with hypertension."),
        ("Volcano monitoring", "Seismometers and gas sensors give early warning of eruptions."),
    ]),
    ("How do vaccines train the immune system?", [
        ("Antibody memory", "Vaccination exposes the immune system to an antigen, so memory B and T cells respond "
         "faster when the real pathogen arrives."),
        ("Bread baking", "Yeast ferments sugars and releases carbon dioxide, which makes the dough rise."),
        ("Herd immunity", "When enough people are immune, transmission chains break and the unvaccinated are "
         "protected as well."),
        ("mRNA vaccines", "Lipid nanoparticles deliver mRNA that makes cells produce a viral protein for a short "
         "time, prompting an immune response."),
        ("River deltas", "Sediment carried by rivers settles where the current slows at the coast."),
    ]),
]
