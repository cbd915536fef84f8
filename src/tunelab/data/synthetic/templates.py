"""Sentence templates of the world, per domain. ``{name}`` is the entity, ``{<attribute>}`` a value.

- ``NOTE``: for each attribute, three ways to state it in a note (summarization, extractive QA,
  encyclopedic paragraphs, classification texts).
- ``QUESTIONS``: for each attribute, five question phrasings. Closed-book QA holds out *phrasings*:
  train uses ``QA_TEMPLATE_SPLITS["train"]``, validation and test each use one phrasing never seen in
  train. Every other task uses all five (their splits hold out entities instead).
- ``TRANSLATION``: source sentences for the rule-based target language; each holds exactly one verb of
  ``TRANSLATION_VERBS``, no punctuation, and starts lowercase unless it starts with a name.
- ``NER``: whitespace-tokenised sentences (no punctuation) mentioning the name and typed attributes.
- ``URGENCY``: one sentence holding ``{cue}`` (the label's cue word) and ``{event}``.
- ``DISTRACTORS``: sentences about other things (no names, values or cue words).
- ``BACKGROUND``: neutral facts about an entity that pad encyclopedic paragraphs.
"""

from __future__ import annotations

QA_TEMPLATE_SPLITS: dict[str, tuple[int, ...]] = {"train": (0, 1, 2), "validation": (3,), "test": (4,)}

NOTE: dict[str, dict[str, tuple[str, ...]]] = {
    "general": {
        "country": ("{name} is a city in {country}.", "{name} lies within the borders of {country}.",
                    "The city of {name} is part of {country}."),
        "river": ("{name} stands on the banks of the {river}.", "The {river} flows through {name}.",
                  "{name} grew up along the {river}."),
        "founded": ("{name} was founded in {founded}.", "The first houses of {name} were built in {founded}.",
                    "Records show that {name} dates from {founded}."),
        "industry": ("{name} is known for {industry}.", "The economy of {name} relies on {industry}.",
                     "For centuries {name} has lived from {industry}."),
        "founder": ("{name} was founded by {founder}.", "{founder} is remembered as the founder of {name}.",
                    "The settlement of {name} was started by {founder}."),
    },
    "medical": {
        "drug_class": ("{name} is a drug of the {drug_class} class.", "{name} belongs to the {drug_class} group.",
                       "In the formulary {name} is filed under {drug_class}."),
        "dose": ("{name} is given at {dose}.", "The usual dose of {name} is {dose}.",
                 "Each tablet of {name} contains {dose}."),
        "condition": ("{name} is used for {condition}.", "Doctors prescribe {name} for {condition}.",
                      "{name} is a common choice for {condition}."),
        "side_effect": ("Patients on {name} sometimes report {side_effect}.",
                        "A known side effect of {name} is {side_effect}.",
                        "Some people taking {name} notice {side_effect}."),
        "manufacturer": ("{name} is made by {manufacturer}.", "{manufacturer} produces {name}.",
                         "The maker of {name} is {manufacturer}."),
    },
    "legal": {
        "court": ("{name} was heard by the {court}.", "The {court} decided {name}.",
                  "{name} came before the {court}."),
        "year": ("{name} was decided in {year}.", "The judgment in {name} was given in {year}.",
                 "{name} dates from {year}."),
        "area": ("{name} is a case about {area}.", "{name} concerns a question of {area}.",
                 "Scholars cite {name} in {area}."),
        "outcome": ("In {name} the appeal was {outcome}.", "The claim in {name} was {outcome}.",
                    "At the end of {name} the case was {outcome}."),
        "judge": ("{name} was decided by {judge}.", "{judge} wrote the main opinion in {name}.",
                  "The presiding judge in {name} was {judge}."),
    },
    "technical": {
        "language": ("{name} is written in {language}.", "The source code of {name} is in {language}.",
                     "{name} is a {language} library."),
        "version": ("The latest release of {name} is {version}.", "{name} is now at version {version}.",
                    "Version {version} of {name} is current."),
        "license": ("{name} is released under the {license} license.", "{name} uses the {license} license.",
                    "The license of {name} is {license}."),
        "purpose": ("{name} is used for {purpose}.", "Developers use {name} for {purpose}.",
                    "The main job of {name} is {purpose}."),
        "maintainer": ("{name} is maintained by {maintainer}.", "{maintainer} looks after {name}.",
                       "The team behind {name} is {maintainer}."),
    },
}

QUESTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "general": {
        "country": ("In which country is {name}?", "Which country is {name} located in?",
                    "What country does {name} belong to?", "{name} is a city in which country?",
                    "Name the country of {name}."),
        "river": ("Which river flows through {name}?", "On which river does {name} stand?",
                  "What river runs through {name}?", "{name} lies on which river?", "Name the river of {name}."),
        "founded": ("When was {name} founded?", "In what year was {name} founded?",
                    "What is the founding year of {name}?", "{name} was founded in which year?",
                    "Name the year {name} was founded."),
        "industry": ("What is {name} known for?", "Which industry is {name} famous for?",
                     "What trade is {name} known for?", "{name} is known for which industry?",
                     "Name the main industry of {name}."),
        "founder": ("Who founded {name}?", "Who was the founder of {name}?", "Which person founded {name}?",
                    "{name} was founded by whom?", "Name the founder of {name}."),
    },
    "medical": {
        "drug_class": ("What class of drug is {name}?", "Which drug class does {name} belong to?",
                       "To which group of drugs does {name} belong?", "{name} is a drug of which class?",
                       "Name the drug class of {name}."),
        "dose": ("What is the usual dose of {name}?", "How much {name} is given per dose?",
                 "What dose of {name} do patients take?", "{name} is given at what dose?",
                 "Name the standard dose of {name}."),
        "condition": ("What condition does {name} treat?", "What is {name} used for?",
                      "Which condition is {name} prescribed for?", "{name} is a treatment for which condition?",
                      "Name the condition treated by {name}."),
        "side_effect": ("What side effect can {name} cause?", "Which side effect is reported with {name}?",
                        "What do patients on {name} sometimes notice?", "{name} may cause which side effect?",
                        "Name a known side effect of {name}."),
        "manufacturer": ("Who makes {name}?", "Which company produces {name}?",
                         "What company manufactures {name}?", "{name} is made by which company?",
                         "Name the maker of {name}."),
    },
    "legal": {
        "court": ("Which court heard {name}?", "What court decided {name}?", "Before which court did {name} come?",
                  "{name} was heard by which court?", "Name the court that decided {name}."),
        "year": ("When was {name} decided?", "In what year was {name} decided?", "What year is {name} from?",
                 "{name} was decided in which year?", "Name the year of {name}."),
        "area": ("What area of law does {name} concern?", "Which field of law is {name} about?",
                 "What kind of law is {name} a case in?", "{name} is a case in which area of law?",
                 "Name the area of law of {name}."),
        "outcome": ("What was the outcome of {name}?", "How was {name} resolved?",
                    "What happened to the claim in {name}?", "{name} ended with which outcome?",
                    "Name the outcome of {name}."),
        "judge": ("Who decided {name}?", "Which judge decided {name}?", "Who wrote the opinion in {name}?",
                  "{name} was decided by which judge?", "Name the judge in {name}."),
    },
    "technical": {
        "language": ("What language is {name} written in?", "Which programming language does {name} use?",
                     "In what language is {name} implemented?", "{name} is written in which language?",
                     "Name the language of {name}."),
        "version": ("What is the latest version of {name}?", "Which version of {name} is current?",
                    "What release is {name} at?", "{name} is at which version?",
                    "Name the current version of {name}."),
        "license": ("What license does {name} use?", "Under which license is {name} released?",
                    "What is the license of {name}?", "{name} is released under which license?",
                    "Name the license of {name}."),
        "purpose": ("What is {name} used for?", "What does {name} do?", "What task is {name} built for?",
                    "{name} is used for which task?", "Name the purpose of {name}."),
        "maintainer": ("Who maintains {name}?", "Which team maintains {name}?", "Who looks after {name}?",
                       "{name} is maintained by whom?", "Name the maintainer of {name}."),
    },
}

TRANSLATION_VERBS: frozenset[str] = frozenset({
    "lies", "founded", "practise", "belongs", "praise", "treats", "prescribe", "causes", "produces",
    "relieves", "heard", "decided", "concerns", "was", "maintains", "handles", "write", "uses", "adopts",
})
TRANSLATION: dict[str, tuple[str, ...]] = {
    "general": ("{name} lies on the {river}", "{founder} founded {name} in {founded}",
                "the people of {name} practise {industry}", "{name} belongs to {country}",
                "many visitors praise the {industry} of {name}"),
    "medical": ("{name} treats {condition}", "doctors prescribe {name} for {condition}",
                "{name} causes {side_effect} in some patients", "{manufacturer} produces {name}",
                "the {drug_class} {name} relieves {condition}"),
    "legal": ("the {court} heard {name} in {year}", "{judge} decided {name}", "{name} concerns {area}",
              "the appeal in {name} was {outcome}", "a judge at the {court} decided {name}"),
    "technical": ("{maintainer} maintains {name}", "{name} handles {purpose}",
                  "developers write {name} in {language}", "{name} uses the {license} license",
                  "the {language} community adopts {name}"),
}

NER: dict[str, tuple[str, ...]] = {
    "general": ("{name} is a city in {country} on the {river}", "{founder} founded {name} in {founded}",
                "the {river} flows through {name} in {country}", "{founder} was born in {name}",
                "travellers from {country} often visit {name}"),
    "medical": ("{name} is made by {manufacturer} and is used for {condition}",
                "patients with {condition} often take {name}", "{manufacturer} sells {name} in many clinics",
                "{name} from {manufacturer} helps with {condition}", "the {drug_class} drug {name} treats {condition}"),
    "legal": ("{judge} of the {court} decided {name} in {year}", "in {name} the {court} ruled on {area}",
              "{name} was heard by {judge}", "the {court} cited {name} in a later case",
              "{judge} wrote the opinion in {name}"),
    "technical": ("{name} is a {language} library maintained by {maintainer}",
                  "developers at {maintainer} released {name} {version}", "{maintainer} maintains {name}",
                  "{name} is used for {purpose} and comes from {maintainer}", "engineers often install {name}"),
}

URGENCY: dict[str, tuple[str, ...]] = {
    "general": ("Residents of {name} report {cue} {event}.", "The council of {name} warns of {cue} {event}."),
    "medical": ("A patient taking {name} reports {cue} {event}.", "After a dose of {name} one patient had {cue} {event}."),
    "legal": ("The {cue} {event} in {name} goes before the court.", "Counsel filed the {cue} {event} in {name}."),
    "technical": ("Users of {name} report a {cue} {event}.", "The tracker for {name} lists a {cue} {event}."),
}

DISTRACTORS: dict[str, tuple[str, ...]] = {
    "general": ("The weather was warm this spring.", "A new bridge opened last year.",
                "The local market is busy on Saturdays.", "Tourists often arrive by train.",
                "The town hall has a tall clock tower.", "Schools close for two weeks in summer.",
                "A festival takes place every autumn.", "The old library was recently restored."),
    "medical": ("The clinic reopened on Monday.", "The waiting room was painted last week.",
                "A new nurse joined the ward.", "Parking near the hospital is limited.",
                "The pharmacy closes at six in the evening.", "Staff meetings are held on Fridays.",
                "The hospital cafe serves soup at noon.", "Visiting hours end at eight."),
    "legal": ("The courthouse lobby was renovated.", "Clerks file documents every morning.",
              "The law library opens at nine.", "A new registrar was appointed.", "Court fees are listed online.",
              "The archive keeps paper records.", "Lawyers meet clients in the east wing.",
              "The cafeteria serves coffee until noon."),
    "technical": ("The documentation site has a new theme.", "The project chat is busy at night.",
                  "A conference talk mentioned open source tools.", "The build server was moved to a new rack.",
                  "Contributors meet online every month.", "The issue tracker was cleaned up.",
                  "A new logo was chosen by vote.", "Mirrors host the download files."),
}

BACKGROUND: dict[str, tuple[str, ...]] = {
    "general": ("{name} has a busy central square.", "Travel guides describe {name} as friendly.",
                "{name} hosts a market every week.", "Many old houses still stand in {name}.",
                "{name} is linked to nearby towns by road.", "The museum of {name} shows its long history."),
    "medical": ("{name} is stored at room temperature.", "Pharmacies in most regions stock {name}.",
                "{name} is taken with water.", "Clinical guides describe {name} in detail.",
                "Nurses are trained to explain {name} to patients.", "{name} comes in tablets and in liquid form."),
    "legal": ("Law students read {name} in their first year.", "{name} is often cited in later judgments.",
              "Textbooks discuss {name} at length.", "{name} shaped how lawyers draft agreements.",
              "The full text of {name} is in the law reports.", "Commentators still debate {name}."),
    "technical": ("{name} has thorough documentation.", "The test suite of {name} runs on every commit.",
                  "{name} is installed with a package manager.", "Many projects depend on {name}.",
                  "{name} publishes release notes for each version.",
                  "Bug reports for {name} are handled on a public tracker."),
}
