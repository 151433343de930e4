package sandbox

import (
	"fmt"
	"regexp"
	"slices"
)

// Languages an execution may ask for.
const (
	LanguagePython = "python"
	LanguageNode   = "node"
	LanguageBash   = "bash"
)

// Languages lists every language the platform knows.
var Languages = []string{LanguagePython, LanguageNode, LanguageBash}

// ValidateLanguage checks that lang is known and that the template supports it.
func ValidateLanguage(lang string, supported []string) error {
	if !slices.Contains(Languages, lang) {
		return fmt.Errorf("%w: language %q is not one of python, node, bash", ErrInvalidArgument, lang)
	}
	if len(supported) > 0 && !slices.Contains(supported, lang) {
		return fmt.Errorf("%w: language %q is not supported by this session's template (supports %v)", ErrInvalidArgument, lang, supported)
	}
	return nil
}

// ImagePrefix is how the built-in template images are named in the agents'
// runtime: ImagePrefix + template id + ":latest".
const ImagePrefix = "localhost/sandbox/"

// Template is the domain view of a template's fields the rules need.
type Template struct {
	ID            string
	Image         string
	Languages     []string
	Description   string
	DefaultLimits Limits
	MaxLimits     Limits
}

// BuiltinTemplates exist after bootstrap and cannot be deleted.
var BuiltinTemplates = []Template{
	{ID: "python-basic", Image: ImagePrefix + "python-basic:latest", Languages: []string{LanguagePython, LanguageBash},
		Description: "Python 3 standard library and bash", DefaultLimits: DefaultLimits, MaxLimits: MaxLimits},
	{ID: "python-datascience", Image: ImagePrefix + "python-datascience:latest", Languages: []string{LanguagePython, LanguageBash},
		Description: "Python 3 with numpy, pandas, scipy and matplotlib", DefaultLimits: DefaultLimits, MaxLimits: MaxLimits},
	{ID: "nodejs-basic", Image: ImagePrefix + "nodejs-basic:latest", Languages: []string{LanguageNode, LanguageBash},
		Description: "Node.js and bash", DefaultLimits: DefaultLimits, MaxLimits: MaxLimits},
}

var idPattern = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// ValidateTemplate checks a template a client wants to create.
func ValidateTemplate(t Template) error {
	if !idPattern.MatchString(t.ID) {
		return fmt.Errorf("%w: template id %q must be 1-63 lower-case letters, digits and dashes", ErrInvalidArgument, t.ID)
	}
	if t.Image == "" {
		return fmt.Errorf("%w: template %q needs an image", ErrInvalidArgument, t.ID)
	}
	if len(t.Languages) == 0 {
		return fmt.Errorf("%w: template %q needs at least one language", ErrInvalidArgument, t.ID)
	}
	for _, l := range t.Languages {
		if err := ValidateLanguage(l, nil); err != nil {
			return fmt.Errorf("template %q: %w", t.ID, err)
		}
	}
	if _, err := ResolveLimits(t.DefaultLimits, DefaultLimits, t.MaxLimits); err != nil {
		return fmt.Errorf("template %q default_limits: %w", t.ID, err)
	}
	return nil
}
